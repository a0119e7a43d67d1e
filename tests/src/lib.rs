//! Support for Tollgate's end-to-end tests beyond the shared test kit: driving Envoy with the
//! official Python SDKs.

pub mod sdk;
