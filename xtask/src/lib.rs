//! The filter's OCI image (the layout Istio's WasmPlugin pulls) and the pins in `k8s/` that
//! name the module and the image by digest.
//!
//! The image is the *oci* variant of the Wasm image spec Istio reads: one layer whose blob is
//! the module's bytes, media type `application/vnd.module.wasm.content.layer.v1+wasm`. So the
//! layer's digest is the module's own sha256, and nothing (no tar, no gzip, no timestamp)
//! stands between the two: the same module always makes the same image.

pub mod modules;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use oci_spec::image::{
    ANNOTATION_REF_NAME, ANNOTATION_TITLE, DescriptorBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// The layer media type of a Wasm module in Istio's *oci* image variant.
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The config media type of that variant.
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";

/// The digests that pin a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmImage {
    /// Hex sha256 of the module: the layer's digest, and the EnvoyFilter's `sha256`.
    pub module_sha256: String,
    /// Hex sha256 of the image manifest: the image's digest, and the WasmPlugin's `sha256`
    /// (Istio compares it with the digest of the manifest it pulled).
    pub manifest_sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` as a blob of the layout at `dir`; returns its hex digest.
fn put_blob(dir: &Path, bytes: &[u8]) -> anyhow::Result<String> {
    let digest = sha256_hex(bytes);
    let path = dir.join("blobs/sha256").join(&digest);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(digest)
}

fn descriptor(
    media: MediaType,
    bytes: &[u8],
    digest: &str,
    annotations: Option<HashMap<String, String>>,
) -> anyhow::Result<oci_spec::image::Descriptor> {
    let mut builder = DescriptorBuilder::default()
        .media_type(media)
        .size(bytes.len() as u64)
        .digest(digest.parse::<Sha256Digest>()?);
    if let Some(a) = annotations {
        builder = builder.annotations(a);
    }
    Ok(builder.build()?)
}

/// Writes the OCI image layout of `wasm` into `dir` (made if missing), tagged `tag`.
pub fn write_wasm_image(wasm: &[u8], dir: &Path, tag: &str) -> anyhow::Result<WasmImage> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))
        .with_context(|| format!("cannot make the image layout at {}", dir.display()))?;
    OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?
        .to_file(dir.join("oci-layout"))?;

    let module_sha256 = put_blob(dir, wasm)?;
    let layer = descriptor(
        MediaType::Other(WASM_LAYER.into()),
        wasm,
        &module_sha256,
        Some(HashMap::from([(
            ANNOTATION_TITLE.to_string(),
            "plugin.wasm".to_string(),
        )])),
    )?;
    // The variant's config is free-form runtime metadata; what Envoy needs is in the module.
    let config_bytes =
        br#"{"type":"envoy_proxy","abiVersions":["v0-0.2.1"],"config":{"rootIds":["tollgate"]}}"#;
    let config_digest = put_blob(dir, config_bytes)?;
    let config = descriptor(
        MediaType::Other(WASM_CONFIG.into()),
        config_bytes,
        &config_digest,
        None,
    )?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(vec![layer])
        .build()?;
    let manifest_bytes = manifest.to_string()?.into_bytes();
    let manifest_sha256 = put_blob(dir, &manifest_bytes)?;

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![descriptor(
            MediaType::ImageManifest,
            &manifest_bytes,
            &manifest_sha256,
            Some(HashMap::from([(
                ANNOTATION_REF_NAME.to_string(),
                tag.to_string(),
            )])),
        )?])
        .build()?;
    index.to_file(dir.join("index.json"))?;
    Ok(WasmImage {
        module_sha256,
        manifest_sha256,
    })
}

/// The files in `k8s/` that pin the filter, and which digest each holds.
pub const PINS: [(&str, Pin); 3] = [
    ("overlays/istio-wasm/wasmplugin.yaml", Pin::Image),
    ("overlays/istio-wasm/workload/wasmplugin.yaml", Pin::Image),
    ("overlays/istio-envoyfilter/envoyfilter.yaml", Pin::Module),
];

/// Which digest a pin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// The image manifest's (WasmPlugin `sha256`).
    Image,
    /// The module's (EnvoyFilter `vm_config.code.remote.sha256`).
    Module,
}

fn pin_pattern() -> regex_lite::Regex {
    // Only the quoted form: an unquoted all-digit hash would be a YAML number.
    #[allow(clippy::unwrap_used)] // a constant pattern
    regex_lite::Regex::new(r#"sha256: "[0-9a-f]{64}""#).unwrap()
}

/// The pins found in `text` (the hex values).
pub fn pins_in(text: &str) -> Vec<String> {
    pin_pattern()
        .find_iter(text)
        .map(|m| m.as_str()[9..73].to_string())
        .collect()
}

/// Rewrites every pin under `k8s` to `image`'s digests; returns the files it changed.
pub fn write_pins(k8s: &Path, image: &WasmImage) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    for (file, pin) in PINS {
        let path = k8s.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        anyhow::ensure!(
            pins_in(&text).len() == 1,
            "{} should hold exactly one `sha256: \"<64 hex>\"` pin",
            path.display()
        );
        let value = match pin {
            Pin::Image => &image.manifest_sha256,
            Pin::Module => &image.module_sha256,
        };
        let new = pin_pattern().replace(&text, format!("sha256: \"{value}\"").as_str());
        if new != text {
            std::fs::write(&path, new.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            changed.push(file.to_string());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_same_module_makes_the_same_image_and_its_layer_is_the_module() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let wasm = b"\0asm\x01\0\0\0 a module";
        let one = write_wasm_image(wasm, a.path(), "0.1.0").unwrap();
        let two = write_wasm_image(wasm, b.path(), "0.1.0").unwrap();
        assert_eq!(one, two);
        assert_eq!(one.module_sha256, sha256_hex(wasm));
        let blob = std::fs::read(a.path().join("blobs/sha256").join(&one.module_sha256)).unwrap();
        assert_eq!(blob, wasm);
        let other = write_wasm_image(b"\0asm\x01\0\0\0 another", b.path(), "0.1.0").unwrap();
        assert_ne!(one.manifest_sha256, other.manifest_sha256);
    }

    #[test]
    fn pins_are_found_only_in_their_quoted_form() {
        let h = "ab".repeat(32);
        assert_eq!(pins_in(&format!("  sha256: \"{h}\"\n")), vec![h.clone()]);
        assert!(pins_in(&format!("  sha256: {h}\n")).is_empty());
    }
}
