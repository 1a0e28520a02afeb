//! URLs without their secrets, for logs, errors and uploaded diagnostics:
//! pre-signed storage URLs carry credentials in the query string, and a URL
//! may carry `user:password@`. What is kept: scheme, host, port and path.

use std::borrow::Cow;

/// `url` without userinfo, query string and fragment. A query or fragment
/// that was there is shown as `?…` so a reader knows something was cut.
pub fn url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let cut = rest.find(['?', '#']);
    let (head, had_query) = match cut {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    let (authority, path) = match head.find('/') {
        Some(i) => (&head[..i], &head[i..]),
        None => (head, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let mut out = String::with_capacity(url.len());
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    out.push_str(host);
    out.push_str(path);
    if had_query {
        out.push_str("?…");
    }
    out
}

/// Where a URL that starts `s` ends: at whitespace or a quote, and without
/// trailing punctuation of the sentence around it.
fn url_end(s: &str) -> usize {
    let end = s
        .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '\\'))
        .unwrap_or(s.len());
    s[..end]
        .trim_end_matches([':', ',', '.', ';', ')', ']'])
        .len()
}

/// Every `http://` or `https://` URL inside `text` passed through [`url`].
/// Text without URLs is returned as is (no copy).
pub fn in_text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let next = ["http://", "https://"]
            .iter()
            .filter_map(|p| lower.find(p))
            .min();
        let Some(start) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = url_end(tail);
        out.push_str(&url(&tail[..end]));
        rest = &tail[end..];
    }
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_fragment_and_userinfo_are_cut() {
        assert_eq!(
            url("https://s3.example/b/os.bundle?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://s3.example/b/os.bundle?…"
        );
        assert_eq!(url("http://u:pw@h:8080/p#frag"), "http://h:8080/p?…");
        assert_eq!(url("http://h/p"), "http://h/p");
        assert_eq!(url("http://h"), "http://h");
    }

    #[test]
    fn urls_inside_text() {
        let t = "GET https://s3.example/x?sig=SECRET: HTTP 403 (\"http://a/b?t=1\")";
        let r = in_text(t);
        assert!(!r.contains("SECRET") && !r.contains("t=1"), "{r}");
        assert!(
            r.contains("https://s3.example/x?…") && r.contains("http://a/b?…"),
            "{r}"
        );
        assert!(matches!(in_text("no url here"), Cow::Borrowed(_)));
        assert!(matches!(in_text("http://h/p plain"), Cow::Borrowed(_)));
    }
}
