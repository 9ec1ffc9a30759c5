//! The S3 client: requests signed by `rusty-s3` (Signature V4, presigned URLs, no I/O of its
//! own) and sent by `ureq` (blocking HTTP, already used for the webhooks). Synchronous on
//! purpose: the push runs a few upload threads, and the async AWS SDK would add a runtime and
//! several minutes of compilation for nothing we need (docs/offsite.md).
//!
//! Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
//! `AWS_SESSION_TOKEN`), or from a credentials file in the AWS format (`[default]`,
//! `aws_access_key_id = …`, `aws_secret_access_key = …`) that must not lie on the backup
//! share. They are never logged: [`S3Client`]'s `Debug` shows the endpoint, bucket and prefix
//! only, and URLs (which carry a signature, not the secret) are not logged either.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusty_s3::actions::{ListObjectsV2, PutObject};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::OffsiteError;

/// How long a signed URL is valid (the request is sent at once).
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);
/// Attempts per request at most (transport errors, 5xx, 429).
const ATTEMPTS: u32 = 3;
/// Pause before the second attempt; doubled before each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(300);

/// Where the off-site copy goes (the `[offsite]` section and the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3-compatible server.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// A folder inside the bucket (may be empty).
    pub prefix: String,
    /// The signing region (`us-east-1` for most non-AWS servers).
    pub region: String,
    /// An AWS-format credentials file, used when the environment has no credentials.
    pub credentials_file: Option<PathBuf>,
    /// The profile in the credentials file (`default`).
    pub profile: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one request's reads and writes.
    pub io_timeout: Duration,
}

impl S3Config {
    /// A configuration with the defaults: region `us-east-1`, profile `default`, 5 s to
    /// connect, 60 s per read or write.
    pub fn new(endpoint: &str, bucket: &str, prefix: &str) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            region: "us-east-1".into(),
            credentials_file: None,
            profile: "default".into(),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// The secret part, kept out of `Debug`.
struct Secret(Credentials);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// S3 Object Lock retention for what a push uploads: COMPLIANCE mode until a date.
///
/// COMPLIANCE, not GOVERNANCE: the case it answers is the credentials themselves leaking
/// (ransomware on the backup host). A GOVERNANCE retention can be lifted by any principal
/// holding `s3:BypassGovernanceRetention`, typically the same administrator key; a
/// COMPLIANCE retention cannot be shortened or removed by anyone, the account's root
/// included, until it expires. The price: nothing locked can be deleted early, so keep
/// `object_lock_days` about the off-site retention span, not years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Objects cannot be deleted or overwritten before this instant.
    pub retain_until: chrono::DateTime<chrono::Utc>,
}

impl ObjectLock {
    /// A retention of `days` days from now.
    pub fn days_from_now(days: u32) -> Self {
        Self {
            retain_until: chrono::Utc::now() + chrono::Duration::days(i64::from(days)),
        }
    }

    /// `x-amz-object-lock-retain-until-date`: ISO 8601, UTC, whole seconds.
    pub fn until_text(&self) -> String {
        self.retain_until.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    /// The headers a PUT of `body` under this retention carries, all of them signed:
    /// the mode, the date and `Content-MD5` (S3 requires an integrity header on any upload
    /// with a retention).
    pub fn headers(&self, body: &[u8]) -> Vec<(&'static str, String)> {
        vec![
            ("content-md5", content_md5(body)),
            ("x-amz-object-lock-mode", "COMPLIANCE".into()),
            ("x-amz-object-lock-retain-until-date", self.until_text()),
        ]
    }

    /// The body of a PutObjectRetention request (`PUT <key>?retention`).
    pub fn retention_xml(&self) -> String {
        format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            self.until_text()
        )
    }
}

/// Base64 of the MD5 of `body` (the `Content-MD5` header).
fn content_md5(body: &[u8]) -> String {
    use base64::Engine;
    use md5::Digest;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

/// Whether a bucket has S3 Object Lock enabled (GetObjectLockConfiguration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockSupport {
    /// `ObjectLockEnabled` is `Enabled`.
    Enabled,
    /// Not enabled on this bucket, or not implemented by the server: what it answered.
    Unavailable(String),
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key relative to the prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A client of one bucket and prefix.
#[derive(Debug)]
pub struct S3Client {
    endpoint: String,
    bucket: Bucket,
    prefix: String,
    credentials: Secret,
    agent: ureq::Agent,
}

/// Reads credentials: environment first, then the credentials file. A file under `share`
/// (the backup target) is refused: whoever can read the share must not get the off-site
/// credentials with it.
pub fn credentials(cfg: &S3Config, share: Option<&Path>) -> Result<Credentials, OffsiteError> {
    if let (Ok(k), Ok(s)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        if !k.is_empty() && !s.is_empty() {
            return Ok(match std::env::var("AWS_SESSION_TOKEN") {
                Ok(t) if !t.is_empty() => Credentials::new_with_token(k, s, t),
                _ => Credentials::new(k, s),
            });
        }
    }
    let Some(path) = &cfg.credentials_file else {
        return Err(OffsiteError::NoCredentials);
    };
    let bad = |reason: String| OffsiteError::BadCredentials {
        path: path.clone(),
        reason,
    };
    if let Some(share) = share {
        let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        let s = std::fs::canonicalize(share).unwrap_or_else(|_| share.to_path_buf());
        if p.starts_with(&s) {
            return Err(bad(format!(
                "lies on the backup target {}: keep it outside the share",
                s.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let (mut key, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == cfg.profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) => Ok(match token {
            Some(t) => Credentials::new_with_token(k, s, t),
            None => Credentials::new(k, s),
        }),
        _ => Err(bad(format!(
            "no aws_access_key_id and aws_secret_access_key in profile [{}]",
            cfg.profile
        ))),
    }
}

/// What one attempt of a request gave.
enum Outcome {
    Ok(ureq::Response),
    NotFound,
    Fail { retry: bool, err: OffsiteError },
}

// The request closures return ureq's own (large) error, matched at once by `attempt`.
#[allow(clippy::result_large_err)]
impl S3Client {
    /// A client for `cfg` with `credentials`; nothing is sent yet.
    pub fn new(cfg: &S3Config, credentials: Credentials) -> Result<Self, OffsiteError> {
        let url: url::Url = cfg.endpoint.parse().map_err(|e| OffsiteError::Setting {
            key: "endpoint",
            reason: format!("{:?}: {e}", cfg.endpoint),
        })?;
        if cfg.bucket.is_empty() {
            return Err(OffsiteError::Setting {
                key: "bucket",
                reason: "is empty".into(),
            });
        }
        let bucket = Bucket::new(url, UrlStyle::Path, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| OffsiteError::Setting {
                key: "endpoint",
                reason: format!("{:?}: {e}", cfg.endpoint),
            })?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(cfg.connect_timeout)
            .timeout_read(cfg.io_timeout)
            .timeout_write(cfg.io_timeout)
            .build();
        Ok(Self {
            endpoint: cfg.endpoint.clone(),
            bucket,
            prefix: cfg.prefix.clone(),
            credentials: Secret(credentials),
            agent,
        })
    }

    /// `endpoint/bucket/prefix`, for messages.
    pub fn location(&self) -> String {
        let mut s = format!(
            "{}/{}",
            self.endpoint.trim_end_matches('/'),
            self.bucket.name()
        );
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        s
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn attempt(
        &self,
        action: &'static str,
        key: &str,
        send: &dyn Fn() -> Result<ureq::Response, ureq::Error>,
    ) -> Outcome {
        match send() {
            Ok(r) => Outcome::Ok(r),
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                let code = xml_code(&body);
                match status {
                    404 if code.as_deref() == Some("NoSuchBucket") => Outcome::Fail {
                        retry: false,
                        err: OffsiteError::NoBucket(self.bucket.name().to_string()),
                    },
                    404 => Outcome::NotFound,
                    401 | 403 => Outcome::Fail {
                        retry: false,
                        err: OffsiteError::Denied {
                            endpoint: self.endpoint.clone(),
                            status,
                            action,
                            key: key.to_string(),
                        },
                    },
                    _ => Outcome::Fail {
                        retry: status >= 500 || status == 429,
                        err: OffsiteError::Unreachable {
                            endpoint: self.endpoint.clone(),
                            action,
                            key: key.to_string(),
                            detail: format!(
                                "HTTP {status}{}",
                                code.map(|c| format!(" {c}")).unwrap_or_default()
                            ),
                        },
                    },
                }
            }
            Err(ureq::Error::Transport(t)) => Outcome::Fail {
                retry: true,
                err: OffsiteError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    action,
                    key: key.to_string(),
                    // The transport error's display includes the URL (a signature, not a
                    // secret, but long): keep its kind and message only.
                    detail: format!(
                        "{:?}{}",
                        t.kind(),
                        t.message().map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                },
            },
        }
    }

    /// Sends with retries; `Ok(None)` on 404.
    fn request(
        &self,
        action: &'static str,
        key: &str,
        send: &dyn Fn() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<Option<ureq::Response>, OffsiteError> {
        let mut backoff = FIRST_BACKOFF;
        let mut n = 0;
        loop {
            n += 1;
            match self.attempt(action, key, send) {
                Outcome::Ok(r) => return Ok(Some(r)),
                Outcome::NotFound => return Ok(None),
                Outcome::Fail { retry, err } => {
                    if !retry || n >= ATTEMPTS {
                        return Err(err);
                    }
                    tracing::debug!(
                        action,
                        key,
                        attempt = n,
                        "S3 request failed, retrying: {err}"
                    );
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
            }
        }
    }

    /// Uploads `bytes` as `key` (relative to the prefix).
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), OffsiteError> {
        self.put_locked(key, bytes, None)
    }

    /// A signed PUT of `full` (the whole key), with `headers` signed into it (the same are
    /// sent), and `query` (a subresource such as `retention`).
    fn signed_put(
        &self,
        full: &str,
        query: Option<&str>,
        headers: &[(&'static str, String)],
    ) -> url::Url {
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials.0), full);
        if let Some(q) = query {
            action.query_mut().insert(q.to_string(), String::new());
        }
        for (k, v) in headers {
            action.headers_mut().insert(*k, v.clone());
        }
        action.sign(SIGN_FOR)
    }

    fn send_put(
        &self,
        action: &'static str,
        full: &str,
        url: &url::Url,
        headers: &[(&'static str, String)],
        bytes: &[u8],
    ) -> Result<(), OffsiteError> {
        match self.request(action, full, &|| {
            let mut req = self.agent.request_url("PUT", url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            req.send_bytes(bytes)
        })? {
            Some(_) => Ok(()),
            None => Err(OffsiteError::NoBucket(self.bucket.name().to_string())),
        }
    }

    /// Uploads `bytes` as `key`, under `lock`'s retention when given.
    pub fn put_locked(
        &self,
        key: &str,
        bytes: &[u8],
        lock: Option<&ObjectLock>,
    ) -> Result<(), OffsiteError> {
        let full = self.full(key);
        let headers = lock.map(|l| l.headers(bytes)).unwrap_or_default();
        let url = self.signed_put(&full, None, &headers);
        self.send_put("upload", &full, &url, &headers, bytes)
    }

    /// Extends the retention of the existing object `key` to `lock` (PutObjectRetention). A
    /// COMPLIANCE retention can only be lengthened: a later date than the current one.
    pub fn extend_retention(&self, key: &str, lock: &ObjectLock) -> Result<(), OffsiteError> {
        let full = self.full(key);
        let body = lock.retention_xml();
        let headers = vec![("content-md5", content_md5(body.as_bytes()))];
        let url = self.signed_put(&full, Some("retention"), &headers);
        self.send_put(
            "extend the retention of",
            &full,
            &url,
            &headers,
            body.as_bytes(),
        )
    }

    /// The Object Lock retention date of `key` (HEAD), `None` when it has none or is gone.
    pub fn retained_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, OffsiteError> {
        let full = self.full(key);
        let url = self
            .bucket
            .head_object(Some(&self.credentials.0), &full)
            .sign(SIGN_FOR);
        let Some(resp) = self.request("look up", &full, &|| {
            self.agent.request_url("HEAD", &url).call()
        })?
        else {
            return Ok(None);
        };
        Ok(resp
            .header("x-amz-object-lock-retain-until-date")
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d.trim()).ok())
            .map(|d| d.with_timezone(&chrono::Utc)))
    }

    /// Asks the server whether the bucket has Object Lock enabled
    /// (GetObjectLockConfiguration, `GET /<bucket>/?object-lock`). A server that does not
    /// implement it, or a bucket created without it, is [`LockSupport::Unavailable`]; a
    /// server down or refusing the credentials is an error.
    pub fn object_lock_support(&self) -> Result<LockSupport, OffsiteError> {
        // rusty-s3 has no action for it: a GetObject of the empty key is `GET /<bucket>/`,
        // the bucket's own URL, to which the `object-lock` subresource is added and signed.
        let mut action = self.bucket.get_object(Some(&self.credentials.0), "");
        action.query_mut().insert("object-lock", "");
        let url = action.sign(SIGN_FOR);
        let name = self.bucket.name().to_string();
        match self.request("read the Object Lock configuration of", &name, &|| {
            self.agent.request_url("GET", &url).call()
        }) {
            Ok(Some(resp)) => {
                let text = resp.into_string().unwrap_or_default();
                if text.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>") {
                    Ok(LockSupport::Enabled)
                } else {
                    Ok(LockSupport::Unavailable(
                        "the bucket's Object Lock configuration is not enabled".into(),
                    ))
                }
            }
            Ok(None) => Ok(LockSupport::Unavailable(
                "the bucket has no Object Lock configuration (HTTP 404)".into(),
            )),
            Err(OffsiteError::Unreachable { detail, .. }) if detail.starts_with("HTTP ") => Ok(
                LockSupport::Unavailable(format!("the server answered {detail}")),
            ),
            Err(e) => Err(e),
        }
    }

    /// Downloads `key`; `None` when it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, OffsiteError> {
        let full = self.full(key);
        let url = self
            .bucket
            .get_object(Some(&self.credentials.0), &full)
            .sign(SIGN_FOR);
        let Some(resp) = self.request("download", &full, &|| {
            self.agent.request_url("GET", &url).call()
        })?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        resp.into_reader()
            // A chunk object is 4 MiB plus a few bytes; a manifest is small.
            .take(256 << 20)
            .read_to_end(&mut out)
            .map_err(|e| OffsiteError::Unreachable {
                endpoint: self.endpoint.clone(),
                action: "download",
                key: full.clone(),
                detail: e.to_string(),
            })?;
        Ok(Some(out))
    }

    /// Whether `key` exists (HEAD).
    pub fn exists(&self, key: &str) -> Result<bool, OffsiteError> {
        let full = self.full(key);
        let url = self
            .bucket
            .head_object(Some(&self.credentials.0), &full)
            .sign(SIGN_FOR);
        Ok(self
            .request("look up", &full, &|| {
                self.agent.request_url("HEAD", &url).call()
            })?
            .is_some())
    }

    /// Deletes `key` (absent: no error).
    pub fn delete(&self, key: &str) -> Result<(), OffsiteError> {
        let full = self.full(key);
        let url = self
            .bucket
            .delete_object(Some(&self.credentials.0), &full)
            .sign(SIGN_FOR);
        self.request("delete", &full, &|| {
            self.agent.request_url("DELETE", &url).call()
        })?;
        Ok(())
    }

    /// Every object under `dir` (relative to the prefix), keys relative to the prefix.
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>, OffsiteError> {
        let full = self.full(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials.0));
            action.with_prefix(full.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_FOR);
            let resp = self
                .request("list", &full, &|| {
                    self.agent.request_url("GET", &url).call()
                })?
                .ok_or_else(|| OffsiteError::NoBucket(self.bucket.name().to_string()))?;
            let text = resp.into_string().map_err(|e| OffsiteError::Unreachable {
                endpoint: self.endpoint.clone(),
                action: "list",
                key: full.clone(),
                detail: e.to_string(),
            })?;
            let (contents, next) = parse_listing(&text).map_err(|e| OffsiteError::Unreachable {
                endpoint: self.endpoint.clone(),
                action: "list",
                key: full.clone(),
                detail: format!("unreadable listing: {e}"),
            })?;
            for (key, size) in contents {
                let key = key.strip_prefix(&strip).unwrap_or(&key).to_string();
                out.push(Listed { key, size });
            }
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Creates the bucket (for the lab and first use); an existing one is fine.
    pub fn create_bucket(&self) -> Result<(), OffsiteError> {
        let url = self
            .bucket
            .create_bucket(&self.credentials.0)
            .sign(SIGN_FOR);
        let name = self.bucket.name().to_string();
        match self.request("create the bucket", &name, &|| {
            self.agent.request_url("PUT", &url).call()
        }) {
            Ok(_) => Ok(()),
            Err(OffsiteError::Unreachable { detail, .. })
                if detail.contains("BucketAlreadyOwnedByYou")
                    || detail.contains("BucketAlreadyExists") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Objects (key, size) and the continuation token of one listing page.
type Listing = (Vec<(String, u64)>, Option<String>);

/// The objects (key, size) and the continuation token of a ListObjectsV2 answer. Read here
/// with quick-xml rather than by rusty-s3's parser, which requires `<ETag>` in every entry,
/// and some servers (s3s-fs, the lab's) leave it out; we need only the key and the size.
fn parse_listing(text: &str) -> Result<Listing, quick_xml::Error> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut path: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut next = None;
    let (mut key, mut size) = (None::<String>, 0u64);
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if name == "Contents" {
                    key = None;
                    size = 0;
                }
                path.push(name);
            }
            Event::End(_) => {
                let ended = path.pop();
                let entry = key.take_if(|_| ended.as_deref() == Some("Contents"));
                out.extend(entry.map(|k| (k, size)));
            }
            Event::Text(t) => {
                let value = t.unescape()?.into_owned();
                let here: Vec<&str> = path.iter().map(String::as_str).collect();
                match here[..] {
                    [.., "Contents", "Key"] => key = Some(value),
                    [.., "Contents", "Size"] => size = value.trim().parse().unwrap_or(0),
                    [.., "NextContinuationToken"] => next = Some(value),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok((out, next))
}

/// The `<Code>` of an S3 error body.
fn xml_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + "<Code>".len();
    let end = body[start..].find("</Code>")? + start;
    Some(body[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> S3Client {
        let cfg = S3Config::new("http://127.0.0.1:9", "b", "p");
        S3Client::new(&cfg, Credentials::new("AKID", "SECRET")).unwrap()
    }

    fn query(url: &url::Url, name: &str) -> Option<String> {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    #[test]
    fn object_lock_headers_are_signed() {
        let c = client();
        let lock = ObjectLock {
            retain_until: chrono::DateTime::parse_from_rfc3339("2026-12-29T10:11:12Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        };
        let headers = lock.headers(b"hello");
        assert_eq!(
            headers,
            vec![
                ("content-md5", "XUFAKrxLKna5cZ2REBfFkg==".to_string()),
                ("x-amz-object-lock-mode", "COMPLIANCE".to_string()),
                (
                    "x-amz-object-lock-retain-until-date",
                    "2026-12-29T10:11:12Z".to_string()
                ),
            ]
        );
        let url = c.signed_put("p/chunks/ab/abcd", None, &headers);
        assert_eq!(url.path(), "/b/p/chunks/ab/abcd");
        let signed = query(&url, "X-Amz-SignedHeaders").unwrap();
        assert_eq!(
            signed,
            "content-md5;host;x-amz-object-lock-mode;x-amz-object-lock-retain-until-date"
        );
        // The signature covers the values: another date signs differently.
        let plain = c.signed_put("p/chunks/ab/abcd", None, &[]);
        assert_eq!(query(&plain, "X-Amz-SignedHeaders").unwrap(), "host");
        let later = ObjectLock {
            retain_until: lock.retain_until + chrono::Duration::days(1),
        };
        let url2 = c.signed_put("p/chunks/ab/abcd", None, &later.headers(b"hello"));
        assert_ne!(
            query(&url, "X-Amz-Signature"),
            query(&url2, "X-Amz-Signature")
        );
    }

    #[test]
    fn retention_extension_is_a_signed_subresource() {
        let c = client();
        let lock = ObjectLock::days_from_now(30);
        let body = lock.retention_xml();
        assert!(body.contains("<Mode>COMPLIANCE</Mode>"));
        assert!(body.contains(&format!(
            "<RetainUntilDate>{}</RetainUntilDate>",
            lock.until_text()
        )));
        let url = c.signed_put(
            "p/chunks/ab/abcd",
            Some("retention"),
            &[("content-md5", content_md5(body.as_bytes()))],
        );
        assert_eq!(query(&url, "retention").as_deref(), Some(""));
        assert_eq!(
            query(&url, "X-Amz-SignedHeaders").as_deref(),
            Some("content-md5;host")
        );
    }

    #[test]
    fn listing_without_etag_parses() {
        let xml = r#"<?xml version="1.0"?><ListBucketResult><Name>b</Name>
            <Contents><Key>p/chunks/ab/ab&amp;1</Key><Size>42</Size></Contents>
            <Contents><Key>p/x</Key><Size>7</Size><ETag>"e"</ETag></Contents>
            <IsTruncated>true</IsTruncated><NextContinuationToken>t1</NextContinuationToken>
            </ListBucketResult>"#;
        let (c, next) = parse_listing(xml).unwrap();
        assert_eq!(
            c,
            vec![("p/chunks/ab/ab&1".to_string(), 42), ("p/x".to_string(), 7)]
        );
        assert_eq!(next.as_deref(), Some("t1"));
    }
}
