//! The environment the CDI controller gives its importer pod, parsed and validated without side effects.
//!
//! Each variable is read the way `cdi-importer` reads it: booleans with Go's `strconv.ParseBool`, an unparseable
//! `FILESYSTEM_OVERHEAD` as 0, `PREALLOCATION` strictly (anything but a boolean fails the import).

use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::size::parse_quantity;
use crate::source::object::{ObjectRef, Store};
use crate::source::registry::ImageRef;
use crate::source::Location;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Prefix of the extra-header variables (`IMPORTER_EXTRA_HEADER_0`, `_1`, ...).
pub const EXTRA_HEADER_PREFIX: &str = "IMPORTER_EXTRA_HEADER_";

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image (or archive) at a [`Location`] the engine opens itself: `IMPORTER_SOURCE=http` (an http(s) URL; a
    /// local path or `file://` URL is accepted too), `s3` (`IMPORTER_ENDPOINT` `http(s)://HOST[:PORT]/BUCKET/KEY`,
    /// path-style) or `gcs` (`gs://BUCKET/OBJECT` or `http(s)://HOST/BUCKET/OBJECT`; the key file in
    /// `GOOGLE_APPLICATION_CREDENTIALS`).
    Location {
        /// Where.
        location: Location,
        /// The `IMPORTER_SOURCE` it came from, as CDI names it in its messages ("Unable to connect to s3 data
        /// source").
        data_source: &'static str,
    },
    /// `IMPORTER_SOURCE=registry`: the containerDisk `docker://…` or `oci-archive:…` at `IMPORTER_ENDPOINT`, with
    /// the platform from `IMPORTER_REGISTRY_IMAGE_ARCHITECTURE`.
    Registry(ImageRef),
    /// `IMPORTER_SOURCE=imageio`: an oVirt disk (or one of its snapshots) through an image transfer.
    Imageio(ImageioEnv),
    /// `IMPORTER_SOURCE=none`: a blank disk.
    Blank,
}

/// The `IMPORTER_SOURCE`s boundimport imports, each with how the pod's variables become a [`Source`]. A new source
/// is one row here, beside its [`Location`] and opener in `source/`; the rest of the importer follows from the
/// `Source` it makes.
const SOURCES: &[(&str, ParseSource)] = &[
    ("http", http_source),
    ("s3", |vars| object_source(vars, "s3", Store::S3)),
    ("gcs", |vars| object_source(vars, "gcs", Store::Gcs)),
    ("registry", registry_source),
    ("imageio", imageio_source),
    ("none", |_| Ok(Source::Blank)),
];

/// How a source's row turns the pod's variables into a [`Source`] (CDI's message when they are wrong).
type ParseSource = fn(&Vars) -> Result<Source>;

/// Whether `IMPORTER_SOURCE=name` is one boundimport imports (empty is CDI's API default, http).
pub fn handles_source(name: &str) -> bool {
    name.is_empty() || SOURCES.iter().any(|(known, _)| *known == name)
}

/// The pod's variables, as a source's row reads them.
struct Vars<'a> {
    all: &'a BTreeMap<String, String>,
    content_type: ContentType,
}

impl Vars<'_> {
    fn get(&self, name: &str) -> &str {
        self.all.get(name).map(String::as_str).unwrap_or("")
    }

    fn non_empty(&self, name: &str) -> Option<String> {
        Some(self.get(name)).filter(|v| !v.is_empty()).map(str::to_string)
    }

    /// `IMPORTER_ENDPOINT`, which every source but `none` needs: CDI's message when it is missing.
    fn endpoint(&self, data_source: &str) -> Result<&str> {
        match self.get("IMPORTER_ENDPOINT") {
            "" => Err(Error::usage(format!(
                "Unable to connect to {data_source} data source: endpoint \"IMPORTER_ENDPOINT\" is missing or blank"
            ))),
            endpoint => Ok(endpoint),
        }
    }

    /// Refuses `IMPORTER_CONTENTTYPE=archive` for a source that only holds disk images, in CDI's words.
    fn disk_images_only(&self, data_source: &str) -> Result<()> {
        match self.content_type {
            ContentType::Archive => {
                Err(Error::usage(format!("Unsupported content type archive when importing from {data_source}")))
            }
            ContentType::Kubevirt => Ok(()),
        }
    }
}

/// The [`Source`] `IMPORTER_SOURCE` names.
fn source_from(vars: &Vars) -> Result<Source> {
    // The controller always sets it; CDI's API default is http.
    let name = match vars.get("IMPORTER_SOURCE") {
        "" => "http",
        name => name,
    };
    match SOURCES.iter().find(|(known, _)| *known == name) {
        Some((_, parse)) => parse(vars),
        None => Err(Error::unsupported(unsupported_source(name))),
    }
}

fn http_source(vars: &Vars) -> Result<Source> {
    let endpoint = vars.endpoint("http")?;
    let location = match endpoint.strip_prefix("file://") {
        Some(path) => Location::Path(PathBuf::from(path)),
        None => Location::parse(endpoint),
    };
    Ok(Source::Location { location, data_source: "http" })
}

fn object_source(vars: &Vars, data_source: &'static str, store: Store) -> Result<Source> {
    let endpoint = vars.get("IMPORTER_ENDPOINT");
    let parsed = match ObjectRef::parse_uri(endpoint) {
        Some(Ok(object)) if store == Store::Gcs && object.store == Store::Gcs => Ok(object),
        _ => ObjectRef::from_endpoint_url(store, endpoint),
    };
    let prefix = if store == Store::Gcs { "GCS Importer: " } else { "" };
    let object = parsed.map_err(|e| {
        Error::usage(format!(
            "Unable to connect to {data_source} data source: {prefix}unable to parse endpoint {endpoint:?}: {e}"
        ))
    })?;
    Ok(Source::Location { location: Location::Object(object), data_source })
}

fn registry_source(vars: &Vars) -> Result<Source> {
    let endpoint = vars.get("IMPORTER_ENDPOINT");
    if !ImageRef::is_image(endpoint) {
        return Err(Error::usage(format!(
            "Could not parse image: Invalid image name \"{endpoint}\", expected docker://… or oci-archive:…"
        )));
    }
    // CDI's variable; the short name is accepted too.
    let arch = vars.non_empty("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE").or(vars.non_empty("REGISTRY_IMAGE_ARCHITECTURE"));
    let image = ImageRef { spec: endpoint.to_string(), arch };
    image.parse().map_err(|e| Error::usage(format!("Could not parse image: {e}")))?;
    image.platform().map_err(|e| Error::usage(format!("Could not parse image: {e}")))?;
    vars.disk_images_only("registry")?;
    Ok(Source::Registry(image))
}

fn imageio_source(vars: &Vars) -> Result<Source> {
    let endpoint = vars.endpoint("imageio")?;
    vars.disk_images_only("imageio")?;
    let disk_id = vars.non_empty("IMPORTER_DISK_ID").ok_or_else(|| {
        Error::usage("Unable to connect to imageio data source: IMPORTER_DISK_ID is missing or blank")
    })?;
    Ok(Source::Imageio(ImageioEnv {
        endpoint: endpoint.to_string(),
        user: vars.get("IMPORTER_ACCESS_KEY_ID").to_string(),
        password: vars.get("IMPORTER_SECRET_KEY").to_string(),
        disk_id,
        current_checkpoint: vars.non_empty("IMPORTER_CURRENT_CHECKPOINT"),
        previous_checkpoint: vars.non_empty("IMPORTER_PREVIOUS_CHECKPOINT"),
    }))
}

/// What an `imageio` import takes from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageioEnv {
    /// The engine's API URL (`IMPORTER_ENDPOINT`, `https://engine/ovirt-engine/api`).
    pub endpoint: String,
    /// The engine user (`IMPORTER_ACCESS_KEY_ID`) and password (`IMPORTER_SECRET_KEY`), for its SSO only.
    pub user: String,
    /// The engine password.
    pub password: String,
    /// The disk (`IMPORTER_DISK_ID`).
    pub disk_id: String,
    /// The snapshot this stage copies (`IMPORTER_CURRENT_CHECKPOINT`), if a warm migration.
    pub current_checkpoint: Option<String>,
    /// The snapshot the previous stage copied (`IMPORTER_PREVIOUS_CHECKPOINT`): set, this stage is a delta.
    pub previous_checkpoint: Option<String>,
}

/// What the source holds (`IMPORTER_CONTENTTYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// A disk image, converted to raw on the volume.
    Kubevirt,
    /// A tar stream extracted into the data directory.
    Archive,
}

/// Everything the importer takes from its environment.
#[derive(Debug, Clone)]
pub struct CdiEnv {
    /// Where the image comes from.
    pub source: Source,
    /// What the source holds.
    pub content_type: ContentType,
    /// Requested size of the disk (`IMPORTER_IMAGE_SIZE`), bytes.
    pub image_size: Option<u64>,
    /// Share of a filesystem volume kept for the filesystem itself (`FILESYSTEM_OVERHEAD`).
    pub filesystem_overhead: f64,
    /// Preallocate the destination (`PREALLOCATION`).
    pub preallocation: bool,
    /// `CACHE_MODE`, accepted and logged: boundimport is bounded in every mode.
    pub cache_mode: String,
    /// Skip TLS verification (`INSECURE_TLS`).
    pub insecure_tls: bool,
    /// Expected checksum of the downloaded bytes (`IMPORTER_CHECKSUM`).
    pub checksum: Option<Checksum>,
    /// Directory of extra CA certificates (`IMPORTER_CERT_DIR`).
    pub cert_dir: Option<PathBuf>,
    /// Directory of the cluster proxy's CA certificates (`IMPORTER_PROXY_CERT_DIR`; CDI reads `/proxycerts/`).
    pub proxy_cert_dir: Option<PathBuf>,
    /// Basic-auth user (`IMPORTER_ACCESS_KEY_ID`), used only together with a secret key.
    pub access_key: Option<String>,
    /// Basic-auth password (`IMPORTER_SECRET_KEY`).
    pub secret_key: Option<String>,
    /// Extra request headers from `IMPORTER_EXTRA_HEADER_<n>`, in order of `n`.
    pub extra_headers: Vec<(String, String)>,
    /// File whose appearance the import waits for, and which may name the image (`IMPORTER_READY_FILE`).
    pub ready_file: Option<PathBuf>,
    /// File created after a successful import (`IMPORTER_DONE_FILE`).
    pub done_file: Option<PathBuf>,
    /// A registry image pulled by the node and served to the pod over HTTP (`IMPORTER_PULL_METHOD=node`): its
    /// labels come from the serving sidecar's `/info`.
    pub node_pull: bool,
    /// Lenient parses worth a log line.
    pub warnings: Vec<String>,
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Splits `Name: value` (CDI splits at the first colon and ignores entries without one).
pub fn parse_header(text: &str) -> Option<(String, String)> {
    let (name, value) = text.split_once(':')?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some((name.to_string(), value.trim().to_string()))
}

/// The unsupported-source message: CDI's wording, and what boundimport does support.
pub fn unsupported_source(source: &str) -> String {
    let names: Vec<&str> = SOURCES.iter().map(|(name, _)| *name).collect();
    let (last, rest) = names.split_last().expect("sources are listed");
    format!(
        "Unknown data source: {source} (unsupported source: boundimport cdi imports from {} and {last})",
        rest.join(", ")
    )
}

impl CdiEnv {
    /// Parses the process environment.
    pub fn from_process() -> Result<CdiEnv> {
        Self::parse(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))))
    }

    /// Parses `vars`. Errors carry the one-line message for the termination log.
    pub fn parse(vars: impl IntoIterator<Item = (String, String)>) -> Result<CdiEnv> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        let get = |name: &str| vars.get(name).map(String::as_str).unwrap_or("");
        let non_empty = |name: &str| Some(get(name)).filter(|v| !v.is_empty()).map(str::to_string);
        let mut warnings = Vec::new();

        let preallocation = parse_go_bool(get("PREALLOCATION")).ok_or_else(|| {
            Error::usage(format!(
                "the PREALLOCATION environment variable is with a wrong value {:?}; should be \"true\" or \"false\"",
                get("PREALLOCATION")
            ))
        })?;

        let content_type = match get("IMPORTER_CONTENTTYPE") {
            "" | "kubevirt" => ContentType::Kubevirt,
            "archive" => ContentType::Archive,
            other => return Err(Error::usage(format!("Unknown content type: {other} (expected kubevirt or archive)"))),
        };

        let source = source_from(&Vars { all: &vars, content_type })?;
        if source == Source::Blank && content_type == ContentType::Archive {
            return Err(Error::usage("Cannot create empty disk with content type archive"));
        }

        let image_size = match get("IMPORTER_IMAGE_SIZE") {
            "" => None,
            text => {
                Some(parse_quantity(text).map_err(|e| Error::usage(format!("invalid IMPORTER_IMAGE_SIZE: {}", e)))?)
            }
        };

        let overhead_text = get("FILESYSTEM_OVERHEAD");
        let filesystem_overhead = match overhead_text.trim().parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 0.0 => value,
            Ok(_) => {
                return Err(Error::usage(format!(
                    "invalid FILESYSTEM_OVERHEAD {overhead_text:?}: expected a fraction such as 0.055"
                )))
            }
            Err(_) => {
                if !overhead_text.is_empty() {
                    warnings.push(format!("FILESYSTEM_OVERHEAD {overhead_text:?} is not a number; using 0"));
                }
                0.0
            }
        };

        let insecure_tls = match parse_go_bool(get("INSECURE_TLS")) {
            Some(value) => value,
            None => {
                if !get("INSECURE_TLS").is_empty() {
                    warnings.push(format!("INSECURE_TLS {:?} is not a boolean; verifying TLS", get("INSECURE_TLS")));
                }
                false
            }
        };

        let checksum = match get("IMPORTER_CHECKSUM").trim() {
            "" => None,
            text => Some(
                text.parse::<Checksum>()
                    .map_err(|e| Error::usage(format!("Unable to connect to http data source: {e}")))?,
            ),
        };

        // The engine's credentials go to its SSO only, never as basic auth to the imageio daemon.
        let basic_auth = !matches!(source, Source::Imageio(_));
        let (access_key, secret_key) = match (non_empty("IMPORTER_ACCESS_KEY_ID"), non_empty("IMPORTER_SECRET_KEY")) {
            (Some(user), Some(password)) if basic_auth => (Some(user), Some(password)),
            _ => (None, None),
        };

        let mut numbered: Vec<(Option<u64>, &str, &str)> = vars
            .iter()
            .filter_map(|(k, v)| {
                let suffix = k.strip_prefix(EXTRA_HEADER_PREFIX)?;
                Some((suffix.parse::<u64>().ok(), suffix, v.as_str()))
            })
            .collect();
        // Numeric suffixes in numeric order, then any others by name.
        numbered.sort_by(|a, b| (a.0.is_none(), a.0, a.1).cmp(&(b.0.is_none(), b.0, b.1)));
        let mut extra_headers = Vec::new();
        for (_, suffix, value) in numbered {
            match parse_header(value) {
                Some((name, value)) => {
                    crate::source::http::check_header(&name, &value)
                        .map_err(|e| Error::usage(format!("{EXTRA_HEADER_PREFIX}{suffix}: {}", e)))?;
                    extra_headers.push((name, value))
                }
                None => warnings.push(format!("{EXTRA_HEADER_PREFIX}{suffix} is not \"Name: value\"; ignored")),
            }
        }

        Ok(CdiEnv {
            source,
            content_type,
            image_size,
            filesystem_overhead,
            preallocation,
            cache_mode: get("CACHE_MODE").to_string(),
            insecure_tls,
            checksum,
            cert_dir: non_empty("IMPORTER_CERT_DIR").map(PathBuf::from),
            proxy_cert_dir: non_empty("IMPORTER_PROXY_CERT_DIR").map(PathBuf::from),
            access_key,
            secret_key,
            extra_headers,
            ready_file: non_empty("IMPORTER_READY_FILE").map(PathBuf::from),
            done_file: non_empty("IMPORTER_DONE_FILE").map(PathBuf::from),
            node_pull: get("IMPORTER_PULL_METHOD") == "node",
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CdiEnv> {
        let mut vars = vec![
            ("PREALLOCATION".to_string(), "false".to_string()),
            ("IMPORTER_SOURCE".to_string(), "http".to_string()),
            ("IMPORTER_ENDPOINT".to_string(), "https://h/disk.qcow2".to_string()),
        ];
        for (k, v) in pairs {
            vars.retain(|(name, _)| name != k);
            vars.push((k.to_string(), v.to_string()));
        }
        CdiEnv::parse(vars)
    }

    #[test]
    fn a_controller_environment_parses() {
        let e = env(&[
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("IMPORTER_IMAGE_SIZE", "10Gi"),
            ("OWNER_UID", "4f2c"),
            ("FILESYSTEM_OVERHEAD", "0.055"),
            ("PREALLOCATION", "true"),
            ("CACHE_MODE", "TRYNONE"),
            ("INSECURE_TLS", "false"),
            ("IMPORTER_CHECKSUM", "md5:900150983cd24fb0d6963f7d28e17f72"),
            ("IMPORTER_CERT_DIR", "/certs"),
            ("IMPORTER_ACCESS_KEY_ID", "user"),
            ("IMPORTER_SECRET_KEY", "pass"),
            ("IMPORTER_EXTRA_HEADER_1", "X-Second:b"),
            ("IMPORTER_EXTRA_HEADER_0", "X-First: a:1 "),
            ("IMPORTER_EXTRA_HEADER_10", "X-Tenth: c"),
        ])
        .unwrap();
        assert_eq!(
            e.source,
            Source::Location { location: Location::Url("https://h/disk.qcow2".into()), data_source: "http" }
        );
        assert_eq!(e.content_type, ContentType::Kubevirt);
        assert_eq!(e.image_size, Some(10 << 30));
        assert_eq!(e.filesystem_overhead, 0.055);
        assert!(e.preallocation);
        assert_eq!(e.cache_mode, "TRYNONE");
        assert!(!e.insecure_tls);
        assert!(e.checksum.is_some());
        assert_eq!(e.cert_dir, Some(PathBuf::from("/certs")));
        assert_eq!((e.access_key.as_deref(), e.secret_key.as_deref()), (Some("user"), Some("pass")));
        let headers: Vec<(&str, &str)> = e.extra_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(headers, [("X-First", "a:1"), ("X-Second", "b"), ("X-Tenth", "c")]);
        assert!(e.warnings.is_empty(), "{:?}", e.warnings);
    }

    #[test]
    fn object_sources_take_cdi_endpoints() {
        let s3 = env(&[("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", "http://minio:9000/bkt/dir/a%20b.img")]);
        let Source::Location { location: Location::Object(object), data_source: "s3" } = s3.unwrap().source else {
            panic!("not an s3 object")
        };
        assert_eq!((object.store, object.bucket.as_str(), object.key.as_str()), (Store::S3, "bkt", "dir/a b.img"));
        assert_eq!(object.endpoint.as_deref(), Some("http://minio:9000"));
        let gs = env(&[("IMPORTER_SOURCE", "gcs"), ("IMPORTER_ENDPOINT", "gs://b/o/x.qcow2")]).unwrap();
        assert!(matches!(
            gs.source,
            Source::Location {
                location: Location::Object(ObjectRef { store: Store::Gcs, endpoint: None, .. }),
                data_source: "gcs"
            }
        ));
        let custom = env(&[("IMPORTER_SOURCE", "gcs"), ("IMPORTER_ENDPOINT", "https://gcs.local/b/o")]).unwrap();
        assert!(matches!(
            custom.source,
            Source::Location { location: Location::Object(ObjectRef { store: Store::Gcs, endpoint: Some(_), .. }), .. }
        ));
        let bad = env(&[("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", "http://minio:9000/bucket-only")]);
        let err = bad.unwrap_err().to_string();
        assert!(err.starts_with("Unable to connect to s3 data source: unable to parse endpoint"), "{err}");
    }

    #[test]
    fn preallocation_is_strict() {
        for good in ["true", "false", "1", "0", "TRUE", "False"] {
            assert!(env(&[("PREALLOCATION", good)]).is_ok(), "{good}");
        }
        for bad in ["", "yes", "no", "treu", " true"] {
            let err = env(&[("PREALLOCATION", bad)]).unwrap_err().to_string();
            assert!(err.contains("PREALLOCATION"), "{err}");
            assert!(err.contains("should be \"true\" or \"false\""), "{err}");
        }
    }

    #[test]
    fn imageio_takes_the_disk_and_checkpoints_and_keeps_the_password_from_basic_auth() {
        let e = env(&[
            ("IMPORTER_SOURCE", "imageio"),
            ("IMPORTER_ENDPOINT", "https://engine/ovirt-engine/api"),
            ("IMPORTER_ACCESS_KEY_ID", "admin@internal"),
            ("IMPORTER_SECRET_KEY", "pw"),
            ("IMPORTER_DISK_ID", "d1"),
            ("IMPORTER_CURRENT_CHECKPOINT", "s2"),
            ("IMPORTER_PREVIOUS_CHECKPOINT", "s1"),
        ])
        .unwrap();
        let Source::Imageio(imageio) = e.source else { panic!("{:?}", e.source) };
        assert_eq!(
            (imageio.user.as_str(), imageio.password.as_str(), imageio.disk_id.as_str()),
            ("admin@internal", "pw", "d1")
        );
        assert_eq!(
            (imageio.current_checkpoint.as_deref(), imageio.previous_checkpoint.as_deref()),
            (Some("s2"), Some("s1"))
        );
        assert_eq!((e.access_key, e.secret_key), (None, None));
        let err = env(&[("IMPORTER_SOURCE", "imageio")]).unwrap_err().to_string();
        assert!(err.contains("IMPORTER_DISK_ID"), "{err}");
    }

    #[test]
    fn sources_other_than_http_and_none_are_refused() {
        for other in ["vddk", "blank"] {
            let err = env(&[("IMPORTER_SOURCE", other)]).unwrap_err().to_string();
            assert!(err.contains("unsupported source"), "{err}");
            assert!(err.starts_with(&format!("Unknown data source: {other}")), "{err}");
        }
        assert_eq!(env(&[("IMPORTER_SOURCE", "none")]).unwrap().source, Source::Blank);
        assert!(env(&[("IMPORTER_ENDPOINT", "")]).is_err());
        let local = env(&[("IMPORTER_ENDPOINT", "file:///images/a.qcow2")]).unwrap();
        assert_eq!(
            local.source,
            Source::Location { location: Location::Path("/images/a.qcow2".into()), data_source: "http" }
        );
    }

    #[test]
    fn registry_sources() {
        let e = env(&[
            ("IMPORTER_SOURCE", "registry"),
            ("IMPORTER_ENDPOINT", "docker://quay.io/containerdisks/fedora:41"),
            ("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64"),
        ])
        .unwrap();
        let Source::Registry(image) = e.source else { panic!("{:?}", e.source) };
        assert_eq!(
            (image.spec.as_str(), image.arch.as_deref()),
            ("docker://quay.io/containerdisks/fedora:41", Some("arm64"))
        );
        let short = env(&[
            ("IMPORTER_SOURCE", "registry"),
            ("IMPORTER_ENDPOINT", "oci-archive:/a.tar"),
            ("REGISTRY_IMAGE_ARCHITECTURE", "amd64"),
        ]);
        assert!(matches!(short.unwrap().source, Source::Registry(ImageRef { arch: Some(_), .. })));
        for bad in ["https://h/x.img", "docker://Bad/Name", ""] {
            let err = env(&[("IMPORTER_SOURCE", "registry"), ("IMPORTER_ENDPOINT", bad)]).unwrap_err().to_string();
            assert!(err.starts_with("Could not parse image"), "{err}");
        }
        let err = env(&[
            ("IMPORTER_SOURCE", "registry"),
            ("IMPORTER_ENDPOINT", "docker://h/r"),
            ("IMPORTER_CONTENTTYPE", "archive"),
        ]);
        assert!(err.unwrap_err().to_string().contains("Unsupported content type archive"));
    }

    #[test]
    fn content_types() {
        assert_eq!(env(&[("IMPORTER_CONTENTTYPE", "archive")]).unwrap().content_type, ContentType::Archive);
        assert_eq!(env(&[]).unwrap().content_type, ContentType::Kubevirt);
        assert!(env(&[("IMPORTER_CONTENTTYPE", "iso")]).is_err());
        let err = env(&[("IMPORTER_CONTENTTYPE", "archive"), ("IMPORTER_SOURCE", "none")]).unwrap_err();
        assert_eq!(err.to_string(), "Cannot create empty disk with content type archive");
    }

    #[test]
    fn lenient_values_read_like_cdi() {
        let e = env(&[("FILESYSTEM_OVERHEAD", "lots"), ("INSECURE_TLS", "yes")]).unwrap();
        assert_eq!(e.filesystem_overhead, 0.0);
        assert!(!e.insecure_tls);
        assert_eq!(e.warnings.len(), 2);
        assert_eq!(env(&[]).unwrap().filesystem_overhead, 0.0);
        assert!(env(&[("FILESYSTEM_OVERHEAD", "-0.1")]).is_err());
        assert!(env(&[("INSECURE_TLS", "true")]).unwrap().insecure_tls);
        // Basic auth needs both halves.
        let half = env(&[("IMPORTER_ACCESS_KEY_ID", "user")]).unwrap();
        assert_eq!((half.access_key, half.secret_key), (None, None));
    }

    #[test]
    fn bad_sizes_and_checksums_fail() {
        assert!(env(&[("IMPORTER_IMAGE_SIZE", "10GB")]).is_err());
        let err = env(&[("IMPORTER_CHECKSUM", "sha256:abc")]).unwrap_err().to_string();
        assert!(err.starts_with("Unable to connect to http data source: invalid checksum"), "{err}");
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("A: b"), Some(("A".into(), "b".into())));
        assert_eq!(parse_header("no colon"), None);
        assert_eq!(parse_header(": empty name"), None);
        let e = env(&[("IMPORTER_EXTRA_HEADER_x", "bad")]).unwrap();
        assert!(e.extra_headers.is_empty());
        assert_eq!(e.warnings.len(), 1);
    }
}
