//! Finding a credential in a request (header, query parameter or cookie) and removing it
//! before the request goes upstream.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use pingora_http::RequestHeader;

use crate::config::CredentialSource;

/// The first credential found, in `sources` order, and the index of the source it came from.
/// With `bearer`, an `Authorization` header counts only with the `Bearer` scheme, and yields
/// what follows it.
pub fn find<'a>(
    req: &'a RequestHeader,
    sources: &[CredentialSource],
    bearer: bool,
) -> Option<(Cow<'a, str>, usize)> {
    sources.iter().enumerate().find_map(|(i, source)| {
        let value = match source {
            CredentialSource::Header(name) => header(req, name, bearer).map(Cow::Borrowed),
            CredentialSource::Query(name) => query(req, name),
            CredentialSource::Cookie(name) => cookie(req, name).map(Cow::Borrowed),
        }?;
        (!value.is_empty()).then_some((value, i))
    })
}

fn header<'a>(req: &'a RequestHeader, name: &str, bearer: bool) -> Option<&'a str> {
    let value = req.headers.get(name)?.to_str().ok()?.trim();
    if bearer && name.eq_ignore_ascii_case("authorization") {
        let (scheme, rest) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(rest.trim_start());
    }
    Some(value)
}

/// The (percent-decoded) value of query parameter `name`.
pub fn query<'a>(req: &'a RequestHeader, name: &str) -> Option<Cow<'a, str>> {
    req.uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> Cow<'_, str> {
    if s.contains(['%', '+']) {
        let plus = s.replace('+', " ");
        Cow::Owned(percent_decode_str(&plus).decode_utf8_lossy().into_owned())
    } else {
        Cow::Borrowed(s)
    }
}

fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

/// Removes the credential `source` names from the request.
pub fn strip(req: &mut RequestHeader, source: &CredentialSource) {
    match source {
        CredentialSource::Header(name) => {
            req.remove_header(name.as_str());
        }
        CredentialSource::Query(name) => {
            let Some(q) = req.uri.query() else { return };
            let kept: Vec<&str> = q
                .split('&')
                .filter(|pair| decode(pair.split_once('=').map_or(*pair, |(k, _)| k)) != *name)
                .collect();
            let path = req.uri.path();
            let uri = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            if let Ok(uri) = uri.parse::<http::Uri>() {
                req.set_uri(uri);
            }
        }
        CredentialSource::Cookie(name) => {
            let kept: Vec<String> = req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|c| !c.is_empty() && c.split_once('=').map_or(*c, |(k, _)| k) != name)
                .map(str::to_string)
                .collect();
            req.remove_header(&http::header::COOKIE);
            if !kept.is_empty() {
                let _ = req.insert_header(http::header::COOKIE, kept.join("; "));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn bearer_tokens_need_the_scheme() {
        let src = [CredentialSource::Header("authorization".into())];
        let r = req("/", &[("authorization", "bEaReR abc.def.ghi")]);
        assert_eq!(find(&r, &src, true).unwrap().0, "abc.def.ghi");
        let r = req("/", &[("authorization", "Basic Zm9vOmJhcg==")]);
        assert!(find(&r, &src, true).is_none());
    }

    #[test]
    fn query_and_cookie_sources_in_order() {
        let src = [
            CredentialSource::Header("x-api-key".into()),
            CredentialSource::Query("api%5Fkey".into()),
            CredentialSource::Query("apikey".into()),
            CredentialSource::Cookie("k".into()),
        ];
        let r = req("/p?a=1&apikey=s%2Fecret&b=2", &[("cookie", "x=1; k=c1")]);
        let (v, i) = find(&r, &src, false).unwrap();
        assert_eq!((v.as_ref(), i), ("s/ecret", 2));
        let r = req("/p", &[("cookie", "x=1; k=c1")]);
        assert_eq!(find(&r, &src, false).unwrap().0, "c1");
        let r = req("/p?apikey=", &[]);
        assert!(find(&r, &src, false).is_none(), "empty values are absent");
    }

    #[test]
    fn stripping_removes_only_the_credential() {
        let mut r = req("/p?a=1&apikey=s&b=2", &[("cookie", "x=1; k=c1; y=2")]);
        strip(&mut r, &CredentialSource::Query("apikey".into()));
        assert_eq!(r.uri.to_string(), "/p?a=1&b=2");
        strip(&mut r, &CredentialSource::Cookie("k".into()));
        assert_eq!(r.headers.get("cookie").unwrap(), "x=1; y=2");
        let mut r = req("/p?apikey=s", &[("cookie", "k=1")]);
        strip(&mut r, &CredentialSource::Query("apikey".into()));
        strip(&mut r, &CredentialSource::Cookie("k".into()));
        assert_eq!(r.uri.to_string(), "/p");
        assert!(r.headers.get("cookie").is_none());
    }
}
