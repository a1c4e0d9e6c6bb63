//! The request as SecLang sees it: collections (`ARGS`, `REQUEST_HEADERS`, `FILES`, ...) and
//! single values (`REQUEST_FILENAME`, `REQUEST_METHOD`, ...), built once per request, with the
//! body's collections added between phase 1 and phase 2. Names and values follow ModSecurity 3:
//! arguments are URL-decoded, `REQUEST_URI` and `REQUEST_FILENAME` percent-decoded, cookies
//! and headers as sent, JSON bodies flattened to `json.a.b` arguments.

use std::borrow::Cow;

/// Every SecLang variable the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Var {
    Args,
    ArgsGet,
    ArgsPost,
    ArgsNames,
    ArgsGetNames,
    ArgsPostNames,
    RequestHeaders,
    RequestHeadersNames,
    RequestCookies,
    RequestCookiesNames,
    Files,
    FilesNames,
    FilesSizes,
    MultipartPartHeaders,
    Xml,
    RequestUri,
    RequestUriRaw,
    RequestFilename,
    RequestBasename,
    RequestLine,
    RequestMethod,
    RequestProtocol,
    QueryString,
    RequestBody,
    RequestBodyLength,
    RemoteAddr,
    ReqbodyProcessor,
    ReqbodyError,
    UniqueId,
    FilesCombinedSize,
    ArgsCombinedSize,
    Tx,
    Ip,
    Global,
    Session,
    User,
    Geo,
    Env,
    MatchedVar,
    MatchedVarName,
    MatchedVars,
    MatchedVarsNames,
    Duration,
}

impl Var {
    pub fn parse(name: &str) -> Option<Var> {
        use Var::*;
        Some(match name.to_ascii_uppercase().as_str() {
            "ARGS" => Args,
            "ARGS_GET" => ArgsGet,
            "ARGS_POST" => ArgsPost,
            "ARGS_NAMES" => ArgsNames,
            "ARGS_GET_NAMES" => ArgsGetNames,
            "ARGS_POST_NAMES" => ArgsPostNames,
            "REQUEST_HEADERS" => RequestHeaders,
            "REQUEST_HEADERS_NAMES" => RequestHeadersNames,
            "REQUEST_COOKIES" => RequestCookies,
            "REQUEST_COOKIES_NAMES" => RequestCookiesNames,
            "FILES" => Files,
            "FILES_NAMES" => FilesNames,
            "FILES_SIZES" => FilesSizes,
            "MULTIPART_PART_HEADERS" => MultipartPartHeaders,
            "XML" => Xml,
            "REQUEST_URI" => RequestUri,
            "REQUEST_URI_RAW" => RequestUriRaw,
            "REQUEST_FILENAME" => RequestFilename,
            "REQUEST_BASENAME" => RequestBasename,
            "REQUEST_LINE" => RequestLine,
            "REQUEST_METHOD" => RequestMethod,
            "REQUEST_PROTOCOL" => RequestProtocol,
            "QUERY_STRING" => QueryString,
            "REQUEST_BODY" => RequestBody,
            "REQUEST_BODY_LENGTH" => RequestBodyLength,
            "REMOTE_ADDR" => RemoteAddr,
            "REQBODY_PROCESSOR" => ReqbodyProcessor,
            "REQBODY_ERROR" => ReqbodyError,
            "UNIQUE_ID" => UniqueId,
            "FILES_COMBINED_SIZE" => FilesCombinedSize,
            "ARGS_COMBINED_SIZE" => ArgsCombinedSize,
            "TX" => Tx,
            "IP" => Ip,
            "GLOBAL" => Global,
            "SESSION" => Session,
            "USER" => User,
            "GEO" => Geo,
            "ENV" => Env,
            "MATCHED_VAR" => MatchedVar,
            "MATCHED_VAR_NAME" => MatchedVarName,
            "MATCHED_VARS" => MatchedVars,
            "MATCHED_VARS_NAMES" => MatchedVarsNames,
            "DURATION" => Duration,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use Var::*;
        match self {
            Args => "ARGS",
            ArgsGet => "ARGS_GET",
            ArgsPost => "ARGS_POST",
            ArgsNames => "ARGS_NAMES",
            ArgsGetNames => "ARGS_GET_NAMES",
            ArgsPostNames => "ARGS_POST_NAMES",
            RequestHeaders => "REQUEST_HEADERS",
            RequestHeadersNames => "REQUEST_HEADERS_NAMES",
            RequestCookies => "REQUEST_COOKIES",
            RequestCookiesNames => "REQUEST_COOKIES_NAMES",
            Files => "FILES",
            FilesNames => "FILES_NAMES",
            FilesSizes => "FILES_SIZES",
            MultipartPartHeaders => "MULTIPART_PART_HEADERS",
            Xml => "XML",
            RequestUri => "REQUEST_URI",
            RequestUriRaw => "REQUEST_URI_RAW",
            RequestFilename => "REQUEST_FILENAME",
            RequestBasename => "REQUEST_BASENAME",
            RequestLine => "REQUEST_LINE",
            RequestMethod => "REQUEST_METHOD",
            RequestProtocol => "REQUEST_PROTOCOL",
            QueryString => "QUERY_STRING",
            RequestBody => "REQUEST_BODY",
            RequestBodyLength => "REQUEST_BODY_LENGTH",
            RemoteAddr => "REMOTE_ADDR",
            ReqbodyProcessor => "REQBODY_PROCESSOR",
            ReqbodyError => "REQBODY_ERROR",
            UniqueId => "UNIQUE_ID",
            FilesCombinedSize => "FILES_COMBINED_SIZE",
            ArgsCombinedSize => "ARGS_COMBINED_SIZE",
            Tx => "TX",
            Ip => "IP",
            Global => "GLOBAL",
            Session => "SESSION",
            User => "USER",
            Geo => "GEO",
            Env => "ENV",
            MatchedVar => "MATCHED_VAR",
            MatchedVarName => "MATCHED_VAR_NAME",
            MatchedVars => "MATCHED_VARS",
            MatchedVarsNames => "MATCHED_VARS_NAMES",
            Duration => "DURATION",
        }
    }

    /// The list whose entries this variable reads, and whether it reads their names.
    pub fn source(self) -> Option<(List, bool)> {
        use Var::*;
        Some(match self {
            ArgsGet => (List::ArgsGet, false),
            ArgsPost => (List::ArgsPost, false),
            ArgsGetNames => (List::ArgsGet, true),
            ArgsPostNames => (List::ArgsPost, true),
            RequestHeaders => (List::Headers, false),
            RequestHeadersNames => (List::Headers, true),
            RequestCookies => (List::Cookies, false),
            RequestCookiesNames => (List::Cookies, true),
            Files => (List::Files, false),
            FilesNames => (List::Files, true),
            FilesSizes => (List::FileSizes, false),
            MultipartPartHeaders => (List::PartHeaders, false),
            _ => return None,
        })
    }
}

/// The request's lists of name/value entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    ArgsGet,
    ArgsPost,
    Headers,
    Cookies,
    Files,
    FileSizes,
    PartHeaders,
}

const LISTS: usize = 7;

/// One entry of a list. `id` numbers the value and `id + 1` the name for the transformation
/// cache.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub name: Cow<'a, [u8]>,
    pub value: Cow<'a, [u8]>,
    pub id: u32,
}

/// Single-valued variables, each with a fixed cache id (their index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Uri,
    UriRaw,
    Filename,
    Basename,
    Line,
    Method,
    Protocol,
    Query,
    Body,
    BodyLength,
    RemoteAddr,
    Processor,
    BodyError,
    UniqueId,
    FilesSize,
    ArgsSize,
}

const SCALARS: usize = 16;

impl Scalar {
    pub fn of(v: Var) -> Option<Scalar> {
        use Scalar::*;
        Some(match v {
            Var::RequestUri => Uri,
            Var::RequestUriRaw => UriRaw,
            Var::RequestFilename => Filename,
            Var::RequestBasename => Basename,
            Var::RequestLine => Line,
            Var::RequestMethod => Method,
            Var::RequestProtocol => Protocol,
            Var::QueryString => Query,
            Var::RequestBody => Body,
            Var::RequestBodyLength => BodyLength,
            Var::RemoteAddr => RemoteAddr,
            Var::ReqbodyProcessor => Processor,
            Var::ReqbodyError => BodyError,
            Var::UniqueId => UniqueId,
            Var::FilesCombinedSize => FilesSize,
            Var::ArgsCombinedSize => ArgsSize,
            _ => return None,
        })
    }
}

/// The body processor chosen for a request (by Content-Type, or `ctl:requestBodyProcessor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processor {
    None,
    UrlEncoded,
    Json,
    Multipart,
    Xml,
}

impl Processor {
    pub fn name(self) -> &'static str {
        match self {
            Processor::None => "",
            Processor::UrlEncoded => "URLENCODED",
            Processor::Json => "JSON",
            Processor::Multipart => "MULTIPART",
            Processor::Xml => "XML",
        }
    }

    pub fn for_content_type(ct: &[u8]) -> Processor {
        let ct = ct.to_ascii_lowercase();
        let main = ct.split(|&b| b == b';').next().unwrap_or(b"");
        let main = main.trim_ascii();
        if main == b"application/x-www-form-urlencoded" {
            Processor::UrlEncoded
        } else if main == b"multipart/form-data" {
            Processor::Multipart
        } else if main == b"application/json" || main.ends_with(b"+json") {
            Processor::Json
        } else if main.ends_with(b"/xml") || main.ends_with(b"+xml") {
            Processor::Xml
        } else {
            Processor::None
        }
    }
}

/// The request's variables.
pub struct Request<'a> {
    lists: [Vec<Entry<'a>>; LISTS],
    scalars: [Cow<'a, [u8]>; SCALARS],
    next_id: u32,
    pub processor: Processor,
}

/// What the gateway hands the engine.
pub struct Head<'a> {
    pub method: &'a str,
    /// The request target as sent (`/a/b?x=1`).
    pub target: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub protocol: &'static str,
    pub headers: &'a http::HeaderMap,
    /// `:authority` of an HTTP/2 request, which then has no Host header.
    pub authority: Option<&'a str>,
    pub remote_addr: &'a str,
    pub unique_id: &'a str,
}

impl<'a> Request<'a> {
    /// The request line, headers, query arguments and cookies (phase 1).
    pub fn new(h: &Head<'a>) -> Request<'a> {
        let mut r = Request {
            lists: Default::default(),
            scalars: Default::default(),
            next_id: SCALARS as u32,
            processor: Processor::None,
        };
        let raw = h.target;
        let query = raw.split_once('?').map(|(_, q)| q);
        let decoded = percent_decode(raw.as_bytes());
        let filename: Cow<'a, [u8]> = match query {
            Some(_) => {
                let cut = decoded
                    .iter()
                    .position(|&b| b == b'?')
                    .unwrap_or(decoded.len());
                Cow::Owned(decoded[..cut].to_vec())
            }
            None => decoded.clone(),
        };
        let basename = match filename.iter().rposition(|&b| b == b'/' || b == b'\\') {
            Some(p) if p + 1 < filename.len() => Cow::Owned(filename[p + 1..].to_vec()),
            Some(_) => Cow::Borrowed(&b""[..]),
            None => filename.clone(),
        };
        r.set(Scalar::Uri, decoded);
        r.set(Scalar::UriRaw, Cow::Borrowed(raw.as_bytes()));
        r.set(Scalar::Filename, filename);
        r.set(Scalar::Basename, basename);
        r.set(
            Scalar::Line,
            Cow::Owned(format!("{} {} {}", h.method, raw, h.protocol).into_bytes()),
        );
        r.set(Scalar::Method, Cow::Borrowed(h.method.as_bytes()));
        r.set(Scalar::Protocol, Cow::Borrowed(h.protocol.as_bytes()));
        r.set(Scalar::Query, Cow::Borrowed(query.unwrap_or("").as_bytes()));
        r.set(Scalar::RemoteAddr, Cow::Borrowed(h.remote_addr.as_bytes()));
        r.set(Scalar::UniqueId, Cow::Borrowed(h.unique_id.as_bytes()));
        r.set(Scalar::BodyError, Cow::Borrowed(b"0"));

        let mut has_host = false;
        for (name, value) in h.headers {
            has_host |= name == http::header::HOST;
            r.push(
                List::Headers,
                Cow::Borrowed(name.as_str().as_bytes()),
                Cow::Borrowed(value.as_bytes()),
            );
            if name == http::header::COOKIE {
                for pair in value.as_bytes().split(|&b| b == b';') {
                    let pair = pair.trim_ascii();
                    if pair.is_empty() {
                        continue;
                    }
                    let (n, v) = match pair.iter().position(|&b| b == b'=') {
                        Some(p) => (&pair[..p], &pair[p + 1..]),
                        None => (pair, &b""[..]),
                    };
                    r.push(List::Cookies, Cow::Borrowed(n), Cow::Borrowed(v));
                }
            }
        }
        if let (false, Some(a)) = (has_host, h.authority) {
            r.push(
                List::Headers,
                Cow::Borrowed(b"host"),
                Cow::Borrowed(a.as_bytes()),
            );
        }
        if let Some(q) = query {
            for (n, v) in form_pairs(q.as_bytes()) {
                r.push(List::ArgsGet, n, v);
            }
        }
        if let Some(ct) = h.headers.get(http::header::CONTENT_TYPE) {
            r.processor = Processor::for_content_type(ct.as_bytes());
        }
        r.set(
            Scalar::Processor,
            Cow::Borrowed(r.processor.name().as_bytes()),
        );
        r.update_sizes();
        r
    }

    fn set(&mut self, s: Scalar, v: Cow<'a, [u8]>) {
        self.scalars[s as usize] = v;
    }

    fn push(&mut self, list: List, name: Cow<'a, [u8]>, value: Cow<'a, [u8]>) {
        let id = self.next_id;
        self.next_id += 2;
        self.lists[list as usize].push(Entry { name, value, id });
    }

    fn update_sizes(&mut self) {
        let args: usize = [List::ArgsGet, List::ArgsPost]
            .iter()
            .flat_map(|l| &self.lists[*l as usize])
            .map(|e| e.name.len() + e.value.len())
            .sum();
        self.set(Scalar::ArgsSize, Cow::Owned(args.to_string().into_bytes()));
    }

    /// Parses the body with the chosen processor (phase 2). `force_body`: fill REQUEST_BODY
    /// even when a processor understood the body (`ctl:forceRequestBodyVariable`).
    pub fn add_body(&mut self, body: &'a [u8], processor: Processor, force_body: bool) {
        self.processor = processor;
        self.set(
            Scalar::Processor,
            Cow::Borrowed(processor.name().as_bytes()),
        );
        self.set(
            Scalar::BodyLength,
            Cow::Owned(body.len().to_string().into_bytes()),
        );
        let mut error = false;
        match processor {
            Processor::UrlEncoded => {
                for (n, v) in form_pairs(body) {
                    self.push(List::ArgsPost, n, v);
                }
            }
            Processor::Json => match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(v) => {
                    let mut out = Vec::new();
                    flatten_json("json", &v, &mut out, 0);
                    for (n, v) in out {
                        self.push(List::ArgsPost, Cow::Owned(n.into_bytes()), Cow::Owned(v));
                    }
                }
                Err(_) => error = true,
            },
            Processor::Multipart => error = !self.add_multipart(body),
            Processor::Xml | Processor::None => {}
        }
        if matches!(processor, Processor::UrlEncoded | Processor::None) || force_body {
            self.set(Scalar::Body, Cow::Borrowed(body));
        }
        if error {
            self.set(Scalar::BodyError, Cow::Borrowed(b"1"));
        }
        self.update_sizes();
    }

    /// multipart/form-data: fields become ARGS_POST, file parts FILES (their file names),
    /// part headers MULTIPART_PART_HEADERS. File contents are not inspected.
    fn add_multipart(&mut self, body: &'a [u8]) -> bool {
        let Some(boundary) = self.multipart_boundary() else {
            return false;
        };
        let delim = [b"--".as_slice(), &boundary].concat();
        let mut files_size = 0usize;
        let mut rest = body;
        let Some(first) = memchr::memmem::find(rest, &delim) else {
            return false;
        };
        rest = &rest[first + delim.len()..];
        let finder = memchr::memmem::Finder::new(&delim).into_owned();
        loop {
            if rest.starts_with(b"--") {
                return true;
            }
            let Some(end) = finder.find(rest) else {
                return false;
            };
            let mut part = &rest[..end];
            rest = &rest[end + delim.len()..];
            part = part.strip_prefix(b"\r\n").unwrap_or(part);
            part = part.strip_suffix(b"\r\n").unwrap_or(part);
            let Some(split) = memchr::memmem::find(part, b"\r\n\r\n") else {
                return false;
            };
            let (head, content) = (&part[..split], &part[split + 4..]);
            let mut name: Option<&[u8]> = None;
            let mut filename: Option<&[u8]> = None;
            for line in head.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.is_empty() {
                    continue;
                }
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let hname = &line[..colon];
                self.push(List::PartHeaders, Cow::Borrowed(hname), Cow::Borrowed(line));
                if hname.eq_ignore_ascii_case(b"content-disposition") {
                    name = disposition_param(&line[colon + 1..], b"name");
                    filename = disposition_param(&line[colon + 1..], b"filename");
                }
            }
            let name = name.unwrap_or(b"");
            match filename {
                Some(f) => {
                    files_size += content.len();
                    self.push(List::Files, Cow::Borrowed(name), Cow::Borrowed(f));
                    self.push(
                        List::FileSizes,
                        Cow::Borrowed(name),
                        Cow::Owned(content.len().to_string().into_bytes()),
                    );
                }
                None => self.push(List::ArgsPost, Cow::Borrowed(name), Cow::Borrowed(content)),
            }
            self.set(
                Scalar::FilesSize,
                Cow::Owned(files_size.to_string().into_bytes()),
            );
        }
    }

    fn multipart_boundary(&self) -> Option<Vec<u8>> {
        let ct = self.lists[List::Headers as usize]
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(b"content-type"))?;
        let v = &ct.value;
        let at = v
            .to_ascii_lowercase()
            .windows(9)
            .position(|w| w == b"boundary=")?;
        let b = &v[at + 9..];
        let b = b.split(|&c| c == b';').next()?.trim_ascii();
        let b = b
            .strip_prefix(b"\"")
            .and_then(|b| b.strip_suffix(b"\""))
            .unwrap_or(b);
        (!b.is_empty()).then(|| b.to_vec())
    }

    pub fn list(&self, l: List) -> &[Entry<'a>] {
        &self.lists[l as usize]
    }

    pub fn scalar(&self, s: Scalar) -> &[u8] {
        &self.scalars[s as usize]
    }

    /// Cache ids in use so far (values and names of entries, and scalars).
    pub fn ids(&self) -> usize {
        self.next_id as usize
    }
}

fn disposition_param<'b>(v: &'b [u8], key: &[u8]) -> Option<&'b [u8]> {
    for p in v.split(|&b| b == b';') {
        let p = p.trim_ascii();
        let Some(eq) = p.iter().position(|&b| b == b'=') else {
            continue;
        };
        if p[..eq].trim_ascii().eq_ignore_ascii_case(key) {
            let val = p[eq + 1..].trim_ascii();
            return Some(
                val.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(val),
            );
        }
    }
    None
}

/// `a=1&b=2` with `+` and `%HH` decoded (names too); an argument without `=` has an empty value.
fn form_pairs(s: &[u8]) -> impl Iterator<Item = (Cow<'_, [u8]>, Cow<'_, [u8]>)> {
    s.split(|&b| b == b'&').filter(|p| !p.is_empty()).map(|p| {
        let (n, v) = match p.iter().position(|&b| b == b'=') {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => (p, &b""[..]),
        };
        (form_decode(n), form_decode(v))
    })
}

fn form_decode(v: &[u8]) -> Cow<'_, [u8]> {
    if v.iter().any(|&b| b == b'%' || b == b'+') {
        Cow::Owned(super::transform::url_decode(v, false))
    } else {
        Cow::Borrowed(v)
    }
}

/// `%HH` only (what ModSecurity applies to the URI; `+` stays).
fn percent_decode(v: &[u8]) -> Cow<'_, [u8]> {
    if !v.contains(&b'%') {
        return Cow::Borrowed(v);
    }
    Cow::Owned(percent_encoding::percent_decode(v).collect())
}

fn flatten_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, Vec<u8>)>, depth: u32) {
    use serde_json::Value;
    if depth > 64 {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten_json(&format!("{prefix}.{k}"), v, out, depth + 1);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten_json(&format!("{prefix}.array_{i}"), v, out, depth + 1);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.as_bytes().to_vec())),
        Value::Null => out.push((prefix.to_string(), Vec::new())),
        other => out.push((prefix.to_string(), other.to_string().into_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head<'a>(target: &'a str, headers: &'a http::HeaderMap) -> Head<'a> {
        Head {
            method: "POST",
            target,
            protocol: "HTTP/1.1",
            headers,
            authority: None,
            remote_addr: "192.0.2.1",
            unique_id: "id",
        }
    }

    #[test]
    fn uri_args_cookies() {
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; b=x%20y;c".parse().unwrap());
        h.insert("host", "x.test".parse().unwrap());
        let r = Request::new(&head("/p%61th/f.php?q=a+b%27&z", &h));
        assert_eq!(r.scalar(Scalar::Filename), b"/path/f.php");
        assert_eq!(r.scalar(Scalar::Basename), b"f.php");
        assert_eq!(r.scalar(Scalar::Query), b"q=a+b%27&z");
        let args: Vec<_> = r
            .list(List::ArgsGet)
            .iter()
            .map(|e| (e.name.to_vec(), e.value.to_vec()))
            .collect();
        assert_eq!(
            args,
            vec![(b"q".to_vec(), b"a b'".to_vec()), (b"z".to_vec(), vec![])]
        );
        let cookies: Vec<_> = r
            .list(List::Cookies)
            .iter()
            .map(|e| e.value.to_vec())
            .collect();
        assert_eq!(cookies, vec![b"1".to_vec(), b"x%20y".to_vec(), vec![]]);
    }

    #[test]
    fn json_and_multipart_bodies() {
        let h = http::HeaderMap::new();
        let mut r = Request::new(&head("/", &h));
        r.add_body(br#"{"a":{"b":"x"},"l":[1,"y"]}"#, Processor::Json, false);
        let args: Vec<_> = r
            .list(List::ArgsPost)
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert_eq!(args, ["json.a.b", "json.l.array_0", "json.l.array_1"]);

        let mut h = http::HeaderMap::new();
        h.insert(
            "content-type",
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"up\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nfile body\r\n--XyZ--\r\n";
        let mut r = Request::new(&head("/", &h));
        r.add_body(body, Processor::Multipart, false);
        assert_eq!(r.list(List::ArgsPost)[0].value.as_ref(), b"hello");
        assert_eq!(r.list(List::Files)[0].value.as_ref(), b"a.txt");
        assert_eq!(r.list(List::PartHeaders).len(), 3);
        assert_eq!(r.scalar(Scalar::BodyError), b"0");
    }
}
