//! The console's templates (vendored into the binary), rendered with HTML auto-escaping.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use minijinja::{Environment, Value};

const TEMPLATES: [(&str, &str); 7] = [
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("error.html", include_str!("templates/error.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("drift.html", include_str!("templates/drift.html")),
    ("operations.html", include_str!("templates/operations.html")),
    ("person.html", include_str!("templates/person.html")),
];

/// The compiled templates.
#[derive(Debug)]
pub struct Pages {
    env: Environment<'static>,
}

impl Pages {
    pub fn new() -> Self {
        let mut env = Environment::new();
        // Escape like the mail and proof templates: minijinja's own escaper writes `/` as
        // `&#x2f;`, which makes addresses and paths unreadable in the source.
        env.set_formatter(|out, state, value| {
            if state.auto_escape() == minijinja::AutoEscape::Html
                && !value.is_safe()
                && !value.is_none()
            {
                out.write_str(&optinsync_engine::templates::html_escape(
                    &value.to_string(),
                ))
                .map_err(minijinja::Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        });
        for (name, source) in TEMPLATES {
            // The templates are part of the binary and tested: a broken one is a build bug.
            if let Err(e) = env.add_template(name, source) {
                tracing::error!(template = name, error = %e, "console template does not compile");
            }
        }
        Self { env }
    }

    /// Render `name` with `ctx`; a template error is a 500 with the error logged.
    pub fn render(&self, name: &str, ctx: Value) -> Response {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(body) => Html(body).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "console page failed to render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page failed to render\n",
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        let pages = Pages::new();
        for (name, _) in TEMPLATES {
            assert!(pages.env.get_template(name).is_ok(), "{name}");
        }
    }
}
