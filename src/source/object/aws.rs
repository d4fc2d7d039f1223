//! AWS credentials as the SDKs' default chain finds them in a pod or on a workstation: keys given to us, else
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else the profile (`AWS_PROFILE`, default
//! `default`) in the shared credentials and config files, else web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
//! `AWS_ROLE_ARN`, as IRSA mounts them) exchanged at STS; with none, requests go unsigned (a public bucket).

use super::{encode_component, xml_text};
use crate::error::{Error, ErrorKind, Result};
use crate::source::http::Client;
use crate::source::HttpOptions;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Temporary credentials are renewed this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Largest STS answer read.
const MAX_STS_ANSWER: u64 = 64 << 10;

/// A key pair, with a session token for temporary credentials.
#[derive(Clone)]
pub(super) struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// When temporary credentials stop working.
    pub expires: Option<SystemTime>,
}

impl Credentials {
    pub fn new(access_key: &str, secret_key: &str, session_token: Option<String>) -> Self {
        Credentials {
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            session_token,
            expires: None,
        }
    }
}

/// One profile's settings from the shared files (the credentials file's section wins over the config file's).
pub(super) struct Profile {
    name: String,
    settings: BTreeMap<String, String>,
}

impl Profile {
    /// The profile `AWS_PROFILE` names (or `default`), if either shared file has it.
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Option<Profile> {
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
        let home = env("HOME").map(PathBuf::from);
        let path = |var: &str, file: &str| env(var).map(PathBuf::from).or_else(|| Some(home.as_ref()?.join(file)));
        let mut settings = BTreeMap::new();
        let config_section = if name == "default" { name.clone() } else { format!("profile {name}") };
        for (file, section) in [
            (path("AWS_CONFIG_FILE", ".aws/config"), config_section),
            (path("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"), name.clone()),
        ] {
            let Some(text) = file.and_then(|f| std::fs::read_to_string(f).ok()) else { continue };
            settings.extend(ini_section(&text, &section));
        }
        (!settings.is_empty()).then_some(Profile { name, settings })
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.settings.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// The `key = value` lines of `[section]` in an INI file.
fn ini_section(text: &str, section: &str) -> BTreeMap<String, String> {
    let mut inside = false;
    let mut found = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if let (true, Some((key, value))) = (inside, line.split_once('=')) {
            if !line.starts_with(['#', ';']) {
                found.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
    }
    found
}

/// Where request credentials come from.
pub(super) enum Provider {
    /// Fixed keys.
    Static(Credentials, &'static str),
    /// A web identity token exchanged at STS, renewed before it expires.
    WebIdentity { exchange: Box<WebIdentity>, current: Mutex<Option<Credentials>> },
    /// No credentials: unsigned requests.
    Anonymous,
}

/// `AssumeRoleWithWebIdentity` at STS.
pub(super) struct WebIdentity {
    token_file: PathBuf,
    role_arn: String,
    session_name: String,
    sts: Client,
}

impl Provider {
    /// The first source of credentials in the chain.
    pub fn resolve(
        given: Option<Credentials>,
        profile: Option<&Profile>,
        region: &str,
        options: &HttpOptions,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Provider> {
        if let Some(given) = given {
            return Ok(Provider::Static(given, "the given keys"));
        }
        if let (Some(key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Provider::Static(
                Credentials::new(&key, &secret, env("AWS_SESSION_TOKEN")),
                "AWS_ACCESS_KEY_ID",
            ));
        }
        if let Some(profile) = profile {
            if let (Some(key), Some(secret)) = (profile.get("aws_access_key_id"), profile.get("aws_secret_access_key"))
            {
                let credentials = Credentials::new(&key, &secret, profile.get("aws_session_token"));
                log::debug!("AWS credentials from profile {}", profile.name);
                return Ok(Provider::Static(credentials, "the shared credentials files"));
            }
        }
        if let (Some(token_file), Some(role_arn)) = (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN")) {
            let sts_url = env("AWS_ENDPOINT_URL_STS").unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            let sts_options = HttpOptions { username: None, password: None, headers: Vec::new(), ..options.clone() };
            let session_name = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "boundimport".to_string());
            let exchange = WebIdentity {
                token_file: token_file.into(),
                role_arn,
                session_name,
                sts: Client::new(&sts_url, &sts_options)?,
            };
            return Ok(Provider::WebIdentity { exchange: Box::new(exchange), current: Mutex::new(None) });
        }
        Ok(Provider::Anonymous)
    }

    /// Where the credentials come from, for the log.
    pub fn describe(&self) -> String {
        match self {
            Provider::Static(_, from) => format!("credentials from {from}"),
            Provider::WebIdentity { exchange, .. } => format!("web identity for {}", exchange.role_arn),
            Provider::Anonymous => "no credentials (unsigned requests)".to_string(),
        }
    }

    /// Credentials valid now, `None` for anonymous access.
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        match self {
            Provider::Static(credentials, _) => Ok(Some(credentials.clone())),
            Provider::Anonymous => Ok(None),
            Provider::WebIdentity { exchange, current } => {
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = |c: &Credentials| c.expires.is_none_or(|t| t > SystemTime::now() + REFRESH_BEFORE);
                if let Some(credentials) = current.as_ref().filter(|c| fresh(c)) {
                    return Ok(Some(credentials.clone()));
                }
                let credentials = exchange.assume()?;
                *current = Some(credentials.clone());
                Ok(Some(credentials))
            }
        }
    }
}

impl WebIdentity {
    /// One `AssumeRoleWithWebIdentity` call (unsigned: the token is the proof).
    fn assume(&self) -> Result<Credentials> {
        let sts = &self.sts;
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| Error::io("reading AWS_WEB_IDENTITY_TOKEN_FILE", e).at_path(&self.token_file))?;
        let mut url = url::Url::parse(sts.name()).map_err(|e| sts.error(ErrorKind::Usage, e.to_string()))?;
        url.set_query(Some(&format!(
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
            encode_component(&self.role_arn),
            encode_component(&self.session_name),
            encode_component(token.trim())
        )));
        let response = sts.request(&url, None, false, &[])?;
        let status = response.status;
        let mut body = Vec::new();
        response.take(MAX_STS_ANSWER).read_to_end(&mut body).map_err(|e| sts.io_error("reading the STS answer", e))?;
        let xml = String::from_utf8_lossy(&body);
        let field = |tag: &str| xml_text(&xml, tag).filter(|v| !v.is_empty());
        if status != 200 {
            let why = match (field("Code"), field("Message")) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (code, _) => code.unwrap_or_else(|| "no error code".to_string()),
            };
            return Err(sts.error(
                ErrorKind::Io,
                format!("AssumeRoleWithWebIdentity for {} failed (HTTP {status}): {why}", self.role_arn),
            ));
        }
        let (Some(key), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
            return Err(
                sts.error(ErrorKind::Io, "AssumeRoleWithWebIdentity answer without AccessKeyId/SecretAccessKey")
            );
        };
        let mut credentials = Credentials::new(&key, &secret, field("SessionToken"));
        credentials.expires = field("Expiration").and_then(|t| parse_utc(&t));
        log::info!(
            "assumed {} with the web identity token; credentials expire {}",
            self.role_arn,
            field("Expiration").unwrap_or_default()
        );
        Ok(credentials)
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` as a time.
pub(super) fn parse_utc(text: &str) -> Option<SystemTime> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !text.ends_with('Z') || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(seconds).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_read_both_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config"), "[default]\nregion = eu-west-3\n[profile dev]\nregion=ap-south-1\n")
            .unwrap();
        std::fs::write(
            dir.path().join("credentials"),
            "[dev]\naws_access_key_id = AK\n# c\naws_secret_access_key=SK\n",
        )
        .unwrap();
        let vars = |profile: Option<&'static str>| {
            let dir = dir.path().to_path_buf();
            move |name: &str| match name {
                "AWS_CONFIG_FILE" => Some(dir.join("config").display().to_string()),
                "AWS_SHARED_CREDENTIALS_FILE" => Some(dir.join("credentials").display().to_string()),
                "AWS_PROFILE" => profile.map(str::to_string),
                _ => None,
            }
        };
        let dev = Profile::load(&vars(Some("dev"))).unwrap();
        assert_eq!(dev.get("region").as_deref(), Some("ap-south-1"));
        assert_eq!(dev.get("aws_access_key_id").as_deref(), Some("AK"));
        let default = Profile::load(&vars(None)).unwrap();
        assert_eq!(default.get("region").as_deref(), Some("eu-west-3"));
        assert_eq!(default.get("aws_access_key_id"), None);
        assert!(Profile::load(&vars(Some("missing"))).is_none());
    }

    #[test]
    fn sts_expirations_parse_as_utc() {
        let t = parse_utc("2023-11-14T22:13:20Z").unwrap();
        assert_eq!(t, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(parse_utc("2023-11-14T22:13:20.123Z"), Some(t));
        assert_eq!(parse_utc("2023-13-14T22:13:20Z"), None);
        assert_eq!(parse_utc("yesterday"), None);
    }
}
