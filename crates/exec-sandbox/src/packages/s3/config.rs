//! Where the L3 store is and the rules its settings follow (S3's own for bucket names).

use std::time::Duration;

use crate::limits;

/// Where L3 layers live and how long requests may take.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct S3Config {
    /// The bucket; `None` switches L3 off.
    pub bucket: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// Prefix of every object name: empty, or ending in `/`.
    pub prefix: String,
    /// An S3-compatible store's URL instead of AWS's (`http` only for a loopback host).
    pub endpoint_url: Option<String>,
    /// Deadlines.
    pub timeouts: S3Timeouts,
    /// Uploads in flight at once.
    pub max_concurrent_uploads: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: None,
            region: limits::DEFAULT_S3_REGION.to_owned(),
            prefix: limits::DEFAULT_S3_PREFIX.to_owned(),
            endpoint_url: None,
            timeouts: S3Timeouts::default(),
            max_concurrent_uploads: limits::S3_MAX_CONCURRENT_UPLOADS,
        }
    }
}

/// Deadlines of S3 requests (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct S3Timeouts {
    /// Connecting.
    pub connect: Duration,
    /// One small operation, retries included; the longest a download may go without a byte.
    pub request: Duration,
    /// The slowest rate a whole layer transfer is given time for, beyond `request`.
    pub min_bytes_per_second: u64,
}

impl Default for S3Timeouts {
    fn default() -> Self {
        Self {
            connect: limits::S3_CONNECT_TIMEOUT,
            request: limits::S3_REQUEST_TIMEOUT,
            min_bytes_per_second: limits::S3_MIN_TRANSFER_BYTES_PER_SECOND,
        }
    }
}

impl S3Timeouts {
    /// Deadline of a whole transfer of a `bytes`-long layer.
    pub(super) fn transfer(&self, bytes: u64) -> Duration {
        self.request + Duration::from_secs(bytes / self.min_bytes_per_second.max(1))
    }
}

/// Why the L3 store could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum S3SetupError {
    /// A configuration field breaks its rule.
    #[error("invalid S3 configuration {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rule.
        reason: String,
    },
    /// The client refused the configuration (e.g. a secret key without a key id).
    #[error("cannot configure the S3 client")]
    Client(#[source] object_store::Error),
}

impl S3Config {
    /// Checks every field (the rules of [`validate_bucket`] and its siblings).
    pub(crate) fn validate(&self) -> Result<(), S3SetupError> {
        let invalid = |field| move |reason| S3SetupError::Invalid { field, reason };
        if let Some(bucket) = &self.bucket {
            validate_bucket(bucket).map_err(invalid("s3_bucket"))?;
        }
        validate_region(&self.region).map_err(invalid("s3_region"))?;
        validate_prefix(&self.prefix).map_err(invalid("s3_prefix"))?;
        if let Some(url) = &self.endpoint_url {
            validate_endpoint_url(url).map_err(invalid("s3_endpoint_url"))?;
        }
        if self.max_concurrent_uploads == 0 {
            return Err(invalid("max_concurrent_uploads")(
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// S3's rules for general purpose bucket names: 3-63 characters of lowercase letters, digits,
/// `.` and `-`, starting and ending with a letter or digit, no `..`, not an IPv4 address, none
/// of the reserved prefixes and suffixes.
pub(crate) fn validate_bucket(name: &str) -> Result<(), String> {
    if !(3..=63).contains(&name.len()) {
        return Err(format!("`{name}` is not 3-63 characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "`{name}` has `{c}`: only lowercase letters, digits, `.` and `-` are allowed"
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(format!(
            "`{name}` must start and end with a letter or a digit"
        ));
    }
    if name.contains("..") {
        return Err(format!("`{name}` has two dots in a row"));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("`{name}` is an IP address"));
    }
    for prefix in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(prefix) {
            return Err(format!("`{name}` starts with the reserved `{prefix}`"));
        }
    }
    for suffix in ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"] {
        if name.ends_with(suffix) {
            return Err(format!("`{name}` ends with the reserved `{suffix}`"));
        }
    }
    Ok(())
}

/// A region name: lowercase letters, digits and `-` (`us-east-1`, `eu-central-2`, or an
/// S3-compatible store's own name).
pub(crate) fn validate_region(region: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&region.len())
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{region}` is not 1-64 lowercase letters, digits and `-`"
        ))
    }
}

/// A key prefix: empty, or `/`-separated segments ending in `/`, each non-empty and not `.` or
/// `..`, of printable ASCII without `\`, at most [`limits::MAX_S3_PREFIX_BYTES`].
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > limits::MAX_S3_PREFIX_BYTES {
        return Err(format!("longer than {} bytes", limits::MAX_S3_PREFIX_BYTES));
    }
    if let Some(c) = prefix.chars().find(|c| !c.is_ascii_graphic() || *c == '\\') {
        return Err(format!(
            "`{prefix}` has {c:?}: only printable ASCII without `\\` is allowed"
        ));
    }
    let Some(body) = prefix.strip_suffix('/') else {
        return Err(format!("`{prefix}` does not end with `/`"));
    };
    if body
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(format!(
            "`{prefix}` has an empty, `.` or `..` segment (or starts with `/`)"
        ));
    }
    Ok(())
}

/// `prefix` as [`validate_prefix`] wants it: no leading `/`, a trailing `/` unless empty.
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_start_matches('/');
    if trimmed.is_empty() || trimmed.ends_with('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/")
    }
}

/// An endpoint URL: `https://host[:port][/path]`, or `http://` to a loopback host (a local
/// test store; anything else would send signed requests and layers in the clear). No
/// credentials, query or fragment.
pub(crate) fn validate_endpoint_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    let Some(host) = url.host() else {
        return Err(format!("`{text}` has no host"));
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(format!(
                "`{text}` is plain http to a host that is not loopback; use https"
            ));
        }
        other => return Err(format!("`{text}`: scheme `{other}` is not http(s)")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{text}` carries credentials; give them through the AWS environment variables"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{text}` has a query or fragment"));
    }
    Ok(())
}

/// `localhost` or a loopback address (plain http is accepted to such hosts only).
pub(crate) fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}
