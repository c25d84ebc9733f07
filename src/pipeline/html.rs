//! HTML from strangers made safe to show in a browser: pure, no IO.
//!
//! ammonia does the work (an allow-list HTML sanitizer built on html5ever). On top of its
//! defaults (no scripts, no event handlers, no `javascript:` URLs, no forms, no styles, no
//! iframes/objects), images may only come from the message itself (`cid:`, matched to the
//! inline attachments by Content-ID) or be embedded (`data:image/...`): a remote image is a
//! tracking pixel or a way to make the desk's browser fetch a stranger's URL. Links stay
//! clickable and get `rel="noopener noreferrer nofollow"`.

use std::sync::OnceLock;

fn sanitizer() -> &'static ammonia::Builder<'static> {
    static BUILDER: OnceLock<ammonia::Builder<'static>> = OnceLock::new();
    BUILDER.get_or_init(|| {
        let mut builder = ammonia::Builder::default();
        builder
            .add_url_schemes(["cid", "data"])
            .link_rel(Some("noopener noreferrer nofollow"))
            .attribute_filter(|element, attribute, value| match (element, attribute) {
                ("img", "src") => {
                    let lower = value.trim_start().to_ascii_lowercase();
                    (lower.starts_with("cid:") || lower.starts_with("data:image/"))
                        .then(|| value.into())
                }
                // data: URLs are for embedded images only, never for links.
                (_, "href") if value.trim_start().to_ascii_lowercase().starts_with("data:") => None,
                _ => Some(value.into()),
            });
        builder
    })
}

/// Returns `html` with everything unsafe removed.
pub fn sanitize(html: &str) -> String {
    sanitizer().clean(html).to_string()
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn scripts_handlers_and_javascript_urls_are_removed() {
        let out = sanitize(
            r#"<p onclick="steal()">Hi<script>alert(1)</script></p><a href="javascript:alert(1)">x</a><form action="https://evil"><input name=p></form><iframe src="https://evil"></iframe>"#,
        );
        for bad in [
            "onclick",
            "<script",
            "alert",
            "javascript:",
            "<form",
            "<input",
            "<iframe",
        ] {
            assert!(!out.contains(bad), "{bad} survived in {out}");
        }
        assert!(out.contains("<p>Hi</p>"), "{out}");
    }

    #[test]
    fn only_cid_and_embedded_images_keep_their_source() {
        let out = sanitize(
            r#"<img src="cid:logo@x"><img src="https://track.example/p.gif"><img src="data:image/png;base64,AAAA"><a href="data:text/html,x">d</a><a href="https://example.com">ok</a>"#,
        );
        assert!(out.contains(r#"src="cid:logo@x""#), "{out}");
        assert!(out.contains("data:image/png"), "{out}");
        assert!(!out.contains("track.example"), "{out}");
        assert!(!out.contains("data:text/html"), "{out}");
        assert!(out.contains(r#"href="https://example.com""#), "{out}");
    }
}
