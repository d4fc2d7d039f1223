//! Manifests, indexes and image configurations: OCI image manifest and index, Docker schema 2 manifest and
//! manifest list. Pure functions of bytes (sizes capped by the caller before parsing), plus [`resolve`], which
//! follows a reference through indexes to one platform's manifest and its configuration, checking every digest.

use super::{fail, sha256_digest, BlobStore, MAX_CONFIG, MAX_INDEX_DEPTH, MAX_MANIFEST};
use crate::error::{ErrorKind, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a registry is asked for, best first.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Most layers an image may have (Docker's own limit is 127; containerDisks have one or two).
pub const MAX_LAYERS: usize = 1024;
/// Labels taken into the termination message at most (kubelet keeps 4096 bytes of it).
pub const MAX_LABELS: usize = 32;
/// Bytes of labels (keys and values) taken at most.
pub const MAX_LABEL_BYTES: usize = 2048;

/// A content descriptor.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the content is.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:HEX`.
    pub digest: String,
    /// Its length in bytes.
    pub size: i64,
    /// For index entries: the platform.
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Annotations (an OCI layout's index names its manifests with `org.opencontainers.image.ref.name`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The size, checked to be non-negative and at most `cap` when given.
    pub fn checked_size(&self, image: &str, step: &str, cap: Option<u64>) -> Result<u64> {
        let size = u64::try_from(self.size).map_err(|_| {
            fail(image, ErrorKind::BadImage, step, format!("negative size {} for {}", self.size, self.digest))
        })?;
        if let Some(cap) = cap {
            if size > cap {
                return Err(fail(
                    image,
                    ErrorKind::BadImage,
                    step,
                    format!("{} is {size} bytes, more than the {cap} accepted", self.digest),
                ));
            }
        }
        Ok(size)
    }
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// CPU architecture (GOARCH spelling: amd64, arm64, …).
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// CPU variant (v7, v8, …).
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or index as it may come: the union of their fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// One image: its configuration and layers, bottom first.
    Manifest {
        /// The configuration blob.
        config: Descriptor,
        /// The layers in order.
        layers: Vec<Descriptor>,
    },
    /// Several platforms' manifests.
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index; `declared` is the media type the store gave (a `Content-Type`). The document's own
/// `mediaType` wins; without either, its fields decide.
pub fn parse(bytes: &[u8], declared: Option<&str>) -> std::result::Result<Parsed, String> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let declared = declared.map(|d| d.split(';').next().unwrap_or("").trim()).filter(|d| !d.is_empty());
    let kind = doc.media_type.as_deref().or(declared).unwrap_or("");
    if doc.schema_version == Some(1) || kind.contains("distribution.manifest.v1") {
        return Err("Docker schema 1 manifests are not supported (push the image again with a current client)".into());
    }
    if doc.schema_version != Some(2) {
        return Err(format!("schemaVersion {:?}, expected 2", doc.schema_version));
    }
    let is_index = match kind {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // application/json, application/octet-stream or nothing: what the document holds.
        _ if doc.manifests.is_some() && doc.layers.is_none() => true,
        _ if doc.layers.is_some() => false,
        other => return Err(format!("unsupported manifest media type {other:?}")),
    };
    if is_index {
        let manifests = doc.manifests.ok_or("an index without a manifests list")?;
        if manifests.len() > MAX_LAYERS {
            return Err(format!("an index of {} manifests", manifests.len()));
        }
        return Ok(Parsed::Index(manifests));
    }
    let config = doc.config.ok_or("a manifest without a config")?;
    let layers = doc.layers.ok_or("a manifest without layers")?;
    if layers.len() > MAX_LAYERS {
        return Err(format!("a manifest of {} layers (at most {MAX_LAYERS})", layers.len()));
    }
    Ok(Parsed::Manifest { config, layers })
}

/// The platform to pick from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// GOARCH-style architecture.
    pub architecture: String,
    /// Variant, when asked for.
    pub variant: Option<String>,
    /// Whether the caller named it (then a single-platform image must match it too, as in CDI).
    pub explicit: bool,
}

impl Wanted {
    /// `ARCH` or `ARCH/VARIANT`; `None` is the host's architecture.
    pub fn parse(arch: Option<&str>) -> std::result::Result<Wanted, String> {
        let Some(text) = arch.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Wanted { architecture: host_architecture().to_string(), variant: None, explicit: false });
        };
        let (architecture, variant) = match text.split_once('/') {
            Some((a, v)) => (a, Some(v.to_string())),
            None => (text, None),
        };
        let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok(architecture) || variant.as_deref().is_some_and(|v| !ok(v)) {
            return Err(format!(
                "invalid architecture {text:?} (expected ARCH or ARCH/VARIANT, e.g. amd64, arm64, arm/v7)"
            ));
        }
        Ok(Wanted { architecture: architecture.to_string(), variant, explicit: true })
    }
}

/// This machine's architecture in the spelling images use (Go's GOARCH).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Variants that stand for the same thing (`arm64` and `arm64/v8`).
fn same_variant(architecture: &str, a: Option<&str>, b: Option<&str>) -> bool {
    let norm = |v: Option<&str>| match (architecture, v.unwrap_or("")) {
        ("arm64", "") => "v8".to_string(),
        (_, v) => v.to_string(),
    };
    norm(a) == norm(b)
}

/// The entry of `manifests` for `wanted` on Linux: the first whose architecture matches (and whose variant, when
/// one is wanted). The error lists what the index has.
pub fn choose<'a>(manifests: &'a [Descriptor], wanted: &Wanted) -> std::result::Result<&'a Descriptor, String> {
    let candidate = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == "linux"
                && p.architecture == wanted.architecture
                && (wanted.variant.is_none()
                    || same_variant(&p.architecture, p.variant.as_deref(), wanted.variant.as_deref()))
        })
    };
    if let Some(found) = manifests.iter().find(candidate) {
        return Ok(found);
    }
    let have: Vec<String> = manifests
        .iter()
        .take(16)
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "no platform".to_string(),
        })
        .collect();
    Err(format!(
        "no image in the index for architecture \"{}\", variant \"{}\", OS \"linux\" (it has: {})",
        wanted.architecture,
        wanted.variant.as_deref().unwrap_or(""),
        if have.is_empty() { "nothing".to_string() } else { have.join(", ") }
    ))
}

/// What matters of an image configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `architecture`.
    pub architecture: String,
    /// `os`.
    pub os: String,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRuntime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRuntime {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// Parses an image configuration.
pub fn parse_config(bytes: &[u8]) -> std::result::Result<Config, String> {
    let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| format!("not an image configuration: {e}"))?;
    let runtime = raw.config.unwrap_or(RawRuntime { env: None, labels: None });
    Ok(Config {
        architecture: raw.architecture,
        os: raw.os,
        env: runtime.env.unwrap_or_default(),
        labels: runtime.labels.unwrap_or_default(),
    })
}

/// CDI's refusal of bootc images.
pub const BOOTC_REFUSAL: &str = "bootc image detected: this image contains an ostree-based bootable OS (containers.bootc=1 or ostree.bootable=1) and cannot be imported as a regular container disk; bootc-to-disk conversion is not yet implemented";

/// Whether the labels mark a bootc/ostree-bootable image (CDI's check).
pub fn is_bootc(labels: &BTreeMap<String, String>) -> bool {
    labels.get("containers.bootc").is_some_and(|v| v == "1") || labels.get("ostree.bootable").is_some_and(|v| v == "1")
}

/// CDI's `envsToLabels`: every `KEY=VALUE` whose key contains `KUBEVIRT_IO_` becomes a label
/// (`INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE` → `instancetype.kubevirt.io/default-instancetype`). Capped at
/// [`MAX_LABELS`] labels and [`MAX_LABEL_BYTES`] bytes so the termination message stays within kubelet's 4096.
pub fn envs_to_labels(envs: &[String]) -> BTreeMap<String, String> {
    const PREFIX: &str = "KUBEVIRT_IO_";
    let mut labels = BTreeMap::new();
    let mut bytes = 0;
    for env in envs {
        let Some((key, value)) = env.split_once('=') else { continue };
        let Some((before, after)) = key.split_once(PREFIX) else { continue };
        let mut label = String::new();
        let elems: Vec<&str> = before.strip_suffix('_').unwrap_or(before).split('_').collect();
        if !elems[0].is_empty() {
            label.push_str(&elems.join("."));
            label.push('.');
        }
        label.push_str("kubevirt.io/");
        label.push_str(&after.split('_').collect::<Vec<_>>().join("-"));
        let label = label.to_lowercase();
        if labels.len() >= MAX_LABELS || bytes + label.len() + value.len() > MAX_LABEL_BYTES {
            log::warn!("image environment has more KUBEVIRT_IO_ labels than the termination message holds; {key} and later ones dropped");
            break;
        }
        bytes += label.len() + value.len();
        labels.insert(label, value.to_string());
    }
    labels
}

/// One platform's image, resolved from a reference.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Digest of its manifest.
    pub digest: String,
    /// Its configuration.
    pub config: Config,
    /// Its layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// Follows the reference of `store` through indexes to the manifest for `wanted`, reads its configuration and
/// checks it: digests of everything fetched, the platform, CDI's bootc refusal.
pub fn resolve(image: &str, store: &dyn BlobStore, wanted: &Wanted) -> Result<Resolved> {
    let mut fetched = store.top()?;
    let mut from_index = false;
    for _ in 0..=MAX_INDEX_DEPTH {
        let step = "reading the manifest";
        let computed = sha256_digest(&fetched.bytes);
        if let Some(expected) = &fetched.digest {
            if *expected != computed {
                return Err(fail(
                    image,
                    ErrorKind::ChecksumMismatch,
                    step,
                    format!("digest mismatch: the manifest's sha256 is {computed}, expected {expected}"),
                ));
            }
        }
        let parsed = parse(&fetched.bytes, fetched.media_type.as_deref())
            .map_err(|why| fail(image, ErrorKind::BadImage, step, why))?;
        match parsed {
            Parsed::Index(manifests) => {
                let chosen = choose(&manifests, wanted)
                    .map_err(|why| fail(image, ErrorKind::Unsupported, "choosing the platform", why))?;
                chosen.checked_size(image, step, Some(MAX_MANIFEST))?;
                super::parse_digest(&chosen.digest).map_err(|why| fail(image, ErrorKind::BadImage, step, why))?;
                log::info!(
                    "{image}: index {computed}: taking {} for {}",
                    chosen.digest,
                    chosen.platform.as_ref().map_or(String::new(), |p| format!("{}/{}", p.os, p.architecture))
                );
                let mut next = store.manifest(&chosen.digest, &chosen.media_type)?;
                next.digest = Some(chosen.digest.clone());
                if next.media_type.is_none() && !chosen.media_type.is_empty() {
                    next.media_type = Some(chosen.media_type.clone());
                }
                fetched = next;
                from_index = true;
            }
            Parsed::Manifest { config, layers } => {
                let step = "reading the image configuration";
                let size = config.checked_size(image, step, Some(MAX_CONFIG))?;
                super::parse_digest(&config.digest).map_err(|why| fail(image, ErrorKind::BadImage, step, why))?;
                let mut bytes = Vec::new();
                let blob = store.blob(&config.digest, size)?;
                super::verified(blob, image, "the image configuration", &config.digest, size)
                    .read_to_end(&mut bytes)
                    .map_err(|e| crate::source::sequential::stream_error(e, image, 0))?;
                let config_parsed = parse_config(&bytes).map_err(|why| fail(image, ErrorKind::BadImage, step, why))?;
                if !from_index && wanted.explicit && config_parsed.architecture != wanted.architecture {
                    return Err(fail(
                        image,
                        ErrorKind::Unsupported,
                        "Error validating architecture",
                        format!(
                            "manifest image architecture: \"{}\" doesn't match requested architecture: \"{}\"",
                            config_parsed.architecture, wanted.architecture
                        ),
                    ));
                }
                if is_bootc(&config_parsed.labels) {
                    return Err(fail(image, ErrorKind::Unsupported, "checking the image", BOOTC_REFUSAL));
                }
                for layer in &layers {
                    super::parse_digest(&layer.digest)
                        .map_err(|why| fail(image, ErrorKind::BadImage, "reading the manifest", why))?;
                    layer.checked_size(image, "reading the manifest", None)?;
                }
                return Ok(Resolved { digest: computed, config: config_parsed, layers });
            }
        }
    }
    Err(fail(image, ErrorKind::BadImage, "reading the manifest", format!("more than {MAX_INDEX_DEPTH} nested indexes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 10,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn labels_like_cdi() {
        let envs = [
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.medium",
            "PREFERENCE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora",
            "KUBEVIRT_IO_PLAIN=x",
            "A__B_KUBEVIRT_IO_C=y",
            "PATH=/usr/bin",
            "NOVALUE_KUBEVIRT_IO_X",
        ]
        .map(String::from);
        let labels = envs_to_labels(&envs);
        assert_eq!(labels.get("instancetype.kubevirt.io/default-instancetype").map(String::as_str), Some("u1.medium"));
        assert_eq!(labels.get("preference.kubevirt.io/default-preference").map(String::as_str), Some("fedora"));
        assert_eq!(labels.get("kubevirt.io/plain").map(String::as_str), Some("x"));
        assert_eq!(labels.get("a..b.kubevirt.io/c").map(String::as_str), Some("y"));
        assert_eq!(labels.len(), 4);
        let many: Vec<String> = (0..100).map(|i| format!("X{i}_KUBEVIRT_IO_K={}", "v".repeat(100))).collect();
        let capped = envs_to_labels(&many);
        assert!(
            capped.len() <= MAX_LABELS
                && capped.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_LABEL_BYTES
        );
    }

    #[test]
    fn platforms() {
        let index = [desc("amd64", None), desc("arm64", Some("v8")), desc("arm", Some("v7"))];
        let want = |a: &str| Wanted::parse(Some(a)).unwrap();
        assert_eq!(choose(&index, &want("amd64")).unwrap(), &index[0]);
        assert_eq!(choose(&index, &want("arm64")).unwrap(), &index[1]);
        assert_eq!(choose(&index, &want("arm64/v8")).unwrap(), &index[1]);
        assert_eq!(choose(&index, &want("arm/v7")).unwrap(), &index[2]);
        let err = choose(&index, &want("s390x")).unwrap_err();
        assert!(err.contains("\"s390x\"") && err.contains("linux/arm/v7"), "{err}");
        assert!(choose(&index, &want("arm/v6")).is_err());
        assert!(Wanted::parse(Some("a b")).is_err());
        let host = Wanted::parse(None).unwrap();
        assert!(!host.explicit && !host.architecture.is_empty());
    }

    #[test]
    fn documents() {
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":2},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":3}]}"#;
        match parse(manifest, None).unwrap() {
            Parsed::Manifest { config, layers } => {
                assert_eq!(config.size, 2);
                assert_eq!(layers.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let index = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:aa","size":2,"platform":{"architecture":"amd64","os":"linux"}}]}"#;
        assert!(matches!(parse(index, Some(OCI_INDEX)).unwrap(), Parsed::Index(m) if m.len() == 1));
        assert!(matches!(parse(index, Some("application/json")).unwrap(), Parsed::Index(_)));
        assert!(parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None).unwrap_err().contains("schema 1"));
        assert!(parse(b"not json", None).is_err());
        assert!(parse(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, None).is_err());
        assert!(
            parse(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#, None).is_err()
        );
    }

    #[test]
    fn configs() {
        let config = parse_config(
            br#"{"architecture":"arm64","os":"linux","config":{"Env":["A=1"],"Labels":{"containers.bootc":"1"}}}"#,
        )
        .unwrap();
        assert_eq!(config.architecture, "arm64");
        assert_eq!(config.env, ["A=1"]);
        assert!(is_bootc(&config.labels));
        assert!(!is_bootc(&parse_config(br#"{"architecture":"amd64"}"#).unwrap().labels));
        assert!(parse_config(br#"{"architecture":3}"#).is_err());
    }
}
