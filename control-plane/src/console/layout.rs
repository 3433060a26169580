//! The page shell every console page shares: the head (the one stylesheet and the one
//! deferred script, both from this origin), the navigation showing only the areas the
//! caller's role may open, who is logged in and the logout form; and the small pieces
//! pages repeat: times (UTC, local time on hover), sizes, empty states, error pages.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use falaj_common::time::Timestamp;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::gate::Ctx;
use crate::admin::ApiError;
use crate::auth::Permission as P;

/// The navigation: path, label, the permission its page needs.
const NAV: [(&str, &str, P); 12] = [
    ("/", "Overview", P::ReadFleet),
    ("/fleet", "Fleet", P::ReadFleet),
    ("/models", "Models", P::ReadFleet),
    ("/rollouts", "Deployments", P::ReadFleet),
    ("/monitoring", "Metrics", P::ReadFleet),
    ("/alerts", "Alerts", P::ReadFleet),
    ("/features", "Features", P::ReadFleet),
    ("/finetune", "Fine-tune", P::ReadFleet),
    ("/audit", "Audit", P::ReadAudit),
    ("/tokens", "Enroll", P::CreateEnrollmentTokens),
    ("/users", "Users", P::ManageUsers),
    ("/apitokens", "API tokens", P::ManageApiTokens),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Falaj" }
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

/// A page without navigation (the login).
pub fn bare(title: &str, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { (body) }
        }
    }
}

/// A console page: `section` is the navigation entry it belongs to; `refresh` (seconds)
/// asks the script to reload the page's `main` in place while it is open. Every page of
/// state refreshes; the pages that show a secret once (users, API tokens, enrollment)
/// do not, as a refresh would fetch them again without it.
pub fn page(ctx: &Ctx, title: &str, section: &str, refresh: Option<u32>, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Falaj" }
                    nav aria-label="Sections" {
                        ul {
                            @for (path, label, permission) in NAV {
                                @if ctx.may(permission) {
                                    li {
                                        @if path == section {
                                            a href=(path) aria-current="page" { (label) }
                                        } @else {
                                            a href=(path) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    form.logout method="post" action="/logout" {
                        span.who { (ctx.principal.actor) " · " (ctx.principal.role.name()) }
                        (csrf(ctx))
                        button type="submit" { "Log out" }
                    }
                }
                main #main data-refresh=[refresh] {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf(ctx: &Ctx) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.csrf); }
}

/// A time in UTC; the script puts the reader's local time in its title.
pub fn time(at: Timestamp) -> Markup {
    let text = at.to_string();
    let shown = text.replace('T', " ").replace('Z', " UTC");
    html! { time datetime=(text) title=(shown) { (shown) } }
}

/// An optional time, or a dash.
pub fn time_or_dash(at: Option<Timestamp>) -> Markup {
    at.map_or_else(|| html! { span.muted { "never" } }, time)
}

/// A time given as RFC 3339 text (as the API's views carry it).
pub fn time_text(text: Option<&str>) -> Markup {
    match text.map(Timestamp::parse) {
        Some(Ok(at)) => time(at),
        Some(Err(_)) => html! { (text.unwrap_or_default()) },
        None => html! { span.muted { "never" } },
    }
}

/// A byte count in the largest unit that keeps it above 1 (KiB, MiB, GiB).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A number with at most `digits` decimals, or a dash.
pub fn num(value: Option<f64>, digits: usize) -> String {
    value.filter(|v| v.is_finite()).map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

/// What to show where a list is empty: what it would hold, and what to do next.
pub fn empty(what: &str, next: &Markup) -> Markup {
    html! {
        div.empty {
            p { strong { (what) } }
            p { (next) }
        }
    }
}

/// A status as a labelled badge (colour is never the only sign: the word is there).
pub fn badge(state: &str) -> Markup {
    let class = match state {
        "connected" | "running" | "promoted" | "succeeded" | "success" | "resolved" | "holds"
        | "verified" | "activated" | "active" => "ok",
        "offline" | "paused" | "pending" | "ordered" | "refused" | "kept parent" | "disabled" => {
            "warn"
        }
        "revoked" | "rolled_back" | "aborted" | "failed" | "failure" | "firing" | "fails"
        | "expired" => "bad",
        _ => "plain",
    };
    html! { span class={ "badge " (class) } { (state) } }
}

fn error_body(status: StatusCode, message: &str) -> Markup {
    bare(
        status.canonical_reason().unwrap_or("Error"),
        &html! {
            main.login {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.notice role="alert" { (message) }
                p { a href="/" { "Back to the console" } }
            }
        },
    )
}

/// An error page.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    (status, error_body(status, message)).into_response()
}

/// An API error as a page: its status and message (a 5xx says only "internal error").
pub fn api_error_page(e: &ApiError) -> Response {
    error_page(e.status(), e.message())
}

/// A form's refusal shown above the page it came from.
pub fn notice(message: &str) -> Markup {
    html! { p.notice role="alert" { (message) } }
}

/// Text already escaped (an SVG chart rendered by [`super::charts`]).
pub fn svg(markup: String) -> Markup {
    PreEscaped(markup)
}

/// Errors of page handlers: an API error shown as a page.
#[derive(Debug)]
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::service::ServiceError> for PageError {
    fn from(e: crate::service::ServiceError) -> Self {
        Self(e.into())
    }
}

impl From<crate::db::DbError> for PageError {
    fn from(e: crate::db::DbError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        api_error_page(&self.0)
    }
}

/// What page handlers return.
pub type PageResult = Result<Markup, PageError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_the_largest_unit_above_one() {
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(2048), "2.0 KiB");
        assert_eq!(size(5 * 1024 * 1024 + 1024 * 512), "5.5 MiB");
    }

    #[test]
    fn times_are_utc_with_a_machine_readable_attribute() {
        let at = Timestamp::parse("2026-12-04T16:00:00Z").unwrap();
        let text = time(at).into_string();
        assert!(text.contains(r#"datetime="2026-12-04T16:00:00Z""#), "{text}");
        assert!(text.contains(">2026-12-04 16:00:00 UTC<"), "{text}");
    }

    #[test]
    fn numbers_without_a_value_are_a_dash() {
        assert_eq!(num(None, 2), "–");
        assert_eq!(num(Some(f64::NAN), 2), "–");
        assert_eq!(num(Some(0.123_456), 3), "0.123");
    }
}
