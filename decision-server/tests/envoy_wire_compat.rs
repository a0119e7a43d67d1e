//! The filter's hand-kept subset of Envoy's ext_authz messages (`tollgate_proto::envoywire`)
//! agrees with Envoy's own definitions (`envoy-types`) on the wire, both ways.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue, HeaderValueOption, HttpResponse,
    HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use prost::Message;
use tollgate_proto::envoywire as wire;

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: 2,
        ..Default::default()
    }
}

fn string_struct(pairs: &[(&str, &str)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_string())),
                    },
                )
            })
            .collect(),
    }
}

#[test]
fn a_check_request_from_the_filter_reads_as_envoys() {
    let sent = wire::CheckRequest {
        attributes: Some(wire::AttributeContext {
            request: Some(wire::attribute_context::Request {
                http: Some(wire::attribute_context::HttpRequest {
                    id: "req-1".into(),
                    method: "POST".into(),
                    headers: HashMap::from([("x-team-id".into(), "research".into())]),
                    path: "/v1/chat/completions?x=1".into(),
                    host: "api.example".into(),
                    scheme: "http".into(),
                    query: "x=1".into(),
                    size: 42,
                    protocol: "HTTP/1.1".into(),
                }),
            }),
            context_extensions: HashMap::from([
                ("tollgate.customer".into(), "acme".into()),
                ("tollgate.dim.teamId".into(), "research".into()),
            ]),
        }),
    };
    let got = CheckRequest::decode(sent.encode_to_vec().as_slice()).unwrap();
    let attrs = got.attributes.unwrap();
    assert_eq!(attrs.context_extensions["tollgate.customer"], "acme");
    assert_eq!(attrs.context_extensions["tollgate.dim.teamId"], "research");
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(http.id, "req-1");
    assert_eq!(http.method, "POST");
    assert_eq!(http.headers["x-team-id"], "research");
    assert_eq!(http.path, "/v1/chat/completions?x=1");
    assert_eq!(http.host, "api.example");
    assert_eq!(http.scheme, "http");
    assert_eq!(http.query, "x=1");
    assert_eq!(http.size, 42);
    assert_eq!(http.protocol, "HTTP/1.1");

    // And back: what Envoy's own filter sends reads in the subset.
    let envoy = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/p".into(),
                    headers: HashMap::from([("a".into(), "b".into())]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: HashMap::from([("k".into(), "v".into())]),
            ..Default::default()
        }),
    };
    let back = wire::CheckRequest::decode(envoy.encode_to_vec().as_slice()).unwrap();
    let attrs = back.attributes.unwrap();
    assert_eq!(attrs.context_extensions["k"], "v");
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!((http.method.as_str(), http.path.as_str()), ("GET", "/p"));
    assert_eq!(http.headers["a"], "b");
}

#[test]
fn the_sidecars_answers_read_in_the_subset() {
    let denied = CheckResponse {
        status: Some(rpc::Status {
            code: 7,
            message: "denied".into(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 429 }),
            headers: vec![header("retry-after", "60")],
            body: "{\"error\":1}".into(),
        })),
        dynamic_metadata: Some(string_struct(&[("reason", "cap")])),
    };
    let got = wire::CheckResponse::decode(denied.encode_to_vec().as_slice()).unwrap();
    let status = got.status.unwrap();
    assert_eq!((status.code, status.message.as_str()), (7, "denied"));
    let Some(wire::check_response::HttpResponse::DeniedResponse(d)) = got.http_response else {
        panic!("not a denial: {:?}", got.http_response)
    };
    assert_eq!(d.status.unwrap().code, 429);
    assert_eq!(d.body, "{\"error\":1}");
    let h = d.headers[0].header.as_ref().unwrap();
    assert_eq!((h.key.as_str(), h.value.as_str()), ("retry-after", "60"));
    assert_eq!(d.headers[0].append_action, 2);
    let meta = got.dynamic_metadata.unwrap();
    assert!(matches!(
        meta.fields["reason"].kind,
        Some(prost_types::value::Kind::StringValue(ref s)) if s == "cap"
    ));

    let ok = CheckResponse {
        status: Some(rpc::Status::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![header("x-tollgate-hold-id", "h1")],
            headers_to_remove: vec!["x-secret".into()],
            response_headers_to_add: vec![header("ratelimit-remaining", "5")],
            ..Default::default()
        })),
        dynamic_metadata: Some(string_struct(&[("holdId", "h1")])),
    };
    let got = wire::CheckResponse::decode(ok.encode_to_vec().as_slice()).unwrap();
    assert_eq!(got.status.unwrap().code, 0);
    let Some(wire::check_response::HttpResponse::OkResponse(o)) = got.http_response else {
        panic!("not a grant")
    };
    assert_eq!(o.headers[0].header.as_ref().unwrap().value, "h1");
    assert_eq!(o.headers_to_remove, ["x-secret"]);
    assert_eq!(
        o.response_headers_to_add[0].header.as_ref().unwrap().key,
        "ratelimit-remaining"
    );

    let error = CheckResponse {
        http_response: Some(HttpResponse::ErrorResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 503 }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let got = wire::CheckResponse::decode(error.encode_to_vec().as_slice()).unwrap();
    assert!(matches!(
        got.http_response,
        Some(wire::check_response::HttpResponse::ErrorResponse(ref e)) if e.status.as_ref().unwrap().code == 503
    ));
}

#[test]
fn route_metadata_reads_in_the_subset() {
    let meta = Metadata {
        filter_metadata: HashMap::from([(
            "tollgate".to_string(),
            string_struct(&[("failMode", "open")]),
        )]),
        ..Default::default()
    };
    let got = wire::Metadata::decode(meta.encode_to_vec().as_slice()).unwrap();
    assert!(matches!(
        got.filter_metadata["tollgate"].fields["failMode"].kind,
        Some(prost_types::value::Kind::StringValue(ref s)) if s == "open"
    ));
}
