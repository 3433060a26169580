//! The admin console: the control plane in a browser, served on the admin address under
//! `/` beside the JSON API (`/v1`). Pages are HTML rendered here from Rust ([`maud`]
//! templates, escaped at compile time), charts are SVG drawn on the server
//! ([`charts`], with `plotters`), and the one stylesheet and the small script are
//! compiled into the binary ([`assets`]): nothing is fetched at run time, so an
//! air-gapped control plane serves the same console.
//!
//! - [`gate`]: every page declares its [`Access`] where it is added ([`Pages`]); the
//!   gate finds the caller's session from its cookie, refuses (and audits) a role
//!   without the permission, checks the CSRF token of every POST, and runs the
//!   handler as the caller, so each change is audited under the person's name;
//! - [`session`]: login, logout and the cookies;
//! - [`layout`]: the page shell, the navigation a role may use, times and empty states;
//! - [`mod@pages`]: one module per area (fleet, models, rollouts, metrics, ...), each calling
//!   the same services the JSON handlers call, never HTTP.
//!
//! What a role may not do is not shown, and is refused by the gate anyway with the
//! permission the underlying API route declares.

pub mod assets;
pub mod charts;
pub mod gate;
pub mod layout;
pub mod pages;
pub mod session;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};

use crate::admin::Api;
use crate::auth::{Access, Permission as P};

/// What the console shows of the daemon beyond the API's state: where agents connect
/// (for the `falaj-agent enroll` line) and the alert rules of the configuration.
#[derive(Debug, Clone)]
pub struct Site {
    /// The QUIC address agents dial.
    pub quic: std::net::SocketAddr,
    /// The configured alert rules.
    pub alert_rules: Vec<falaj_common::alerting::AlertRule>,
}

/// One method of one console path and what it requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRule {
    /// GET (pages, also HEAD) or POST (forms).
    pub method: Method,
    /// The path as routed (`/fleet/{id}`).
    pub path: &'static str,
    /// What it requires.
    pub access: Access,
}

/// The console's routes, each with its access (as [`crate::auth::Routes`] does for the API).
#[derive(Debug)]
#[must_use]
pub struct Pages {
    router: Router<Api>,
    rules: Vec<PageRule>,
}

impl Pages {
    fn new() -> Self {
        Self { router: Router::new(), rules: Vec::new() }
    }

    fn add(
        mut self,
        method: Method,
        path: &'static str,
        access: Access,
        route: MethodRouter<Api>,
    ) -> Self {
        assert!(
            !self.rules.iter().any(|r| r.method == method && r.path == path),
            "{method} {path} is declared twice"
        );
        self.rules.push(PageRule { method, path, access });
        self.router = self.router.route(path, route);
        self
    }

    fn get<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::GET, path, access.into(), get(handler))
    }

    fn post<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::POST, path, access.into(), post(handler))
    }

    /// Every console route and what it requires, in the order declared.
    pub fn rules(&self) -> &[PageRule] {
        &self.rules
    }

    /// The router: every page behind the gate and the security headers.
    fn finish(self, api: Api) -> Router {
        let mut table: BTreeMap<&'static str, BTreeMap<String, Access>> = BTreeMap::new();
        for rule in &self.rules {
            table.entry(rule.path).or_default().insert(rule.method.to_string(), rule.access);
        }
        let gate = gate::Gate { api: api.clone(), table: Arc::new(table) };
        self.router
            .layer(axum::middleware::from_fn_with_state(gate, gate::check))
            .layer(axum::middleware::map_response(gate::headers))
            .with_state(api)
    }
}

/// Every page of the console with the permission it needs: the permission of the API
/// route whose data it shows or whose action it takes.
pub fn pages() -> Pages {
    use pages::{apitokens, audit, features, finetune, fleet, metrics, models, rollouts, users};
    Pages::new()
        .get("/assets/console.css", Access::Public, assets::css)
        .get("/assets/console.js", Access::Public, assets::js)
        .get("/login", Access::Public, session::login_page)
        .post("/login", Access::Public, session::login)
        .post("/logout", P::OwnSession, session::logout)
        .get("/", P::ReadFleet, fleet::overview)
        .get("/fleet", P::ReadFleet, fleet::list)
        .get("/fleet/{id}", P::ReadFleet, fleet::agent)
        .get("/models", P::ReadFleet, models::list)
        .get("/rollouts", P::ReadFleet, rollouts::list)
        .post("/deployments", P::Deploy, rollouts::deploy)
        .post("/rollouts", P::ManageRollouts, rollouts::start)
        .get("/rollouts/{group}/{model}", P::ReadFleet, rollouts::show)
        .post("/rollouts/{group}/{model}/{action}", P::ManageRollouts, rollouts::act)
        .get("/monitoring", P::ReadFleet, metrics::show)
        .get("/alerts", P::ReadFleet, metrics::alerts)
        .get("/features", P::ReadFleet, features::list)
        .get("/features/{name}", P::ReadFleet, features::show)
        .get("/finetune", P::ReadFleet, finetune::list)
        .get("/finetune/{id}", P::ReadFleet, finetune::show)
        .get("/audit", P::ReadAudit, audit::log)
        .get("/audit/export", P::ReadAudit, audit::export)
        .get("/users", P::ManageUsers, users::list)
        .post("/users", P::ManageUsers, users::add)
        .post("/users/{name}/{action}", P::ManageUsers, users::act)
        .get("/apitokens", P::ManageApiTokens, apitokens::list)
        .post("/apitokens", P::ManageApiTokens, apitokens::create)
        .post("/apitokens/{name}/revoke", P::ManageApiTokens, apitokens::revoke)
        .get("/tokens", P::CreateEnrollmentTokens, users::tokens_page)
        .post("/tokens", P::CreateEnrollmentTokens, users::create_token)
}

/// The console's router, to merge beside the API's ([`crate::admin::router`]).
pub fn router(api: Api) -> Router {
    pages().finish(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page that changes something is a POST that needs more than reading, and
    /// every page but the login and the assets needs a permission.
    #[test]
    fn every_page_declares_its_access() {
        for rule in pages().rules() {
            let public = matches!(rule.access, Access::Public);
            let open = rule.path == "/login" || rule.path.starts_with("/assets/");
            assert_eq!(public, open, "{} {}", rule.method, rule.path);
            if rule.method == Method::POST && !open {
                assert!(
                    !matches!(rule.access, Access::Requires(P::ReadFleet | P::ReadAudit)),
                    "{} {} changes state with a read permission",
                    rule.method,
                    rule.path
                );
            }
        }
    }

    /// The console and the API share the admin address: no path may be both's (axum
    /// would refuse to start; `/metrics` is Prometheus's, the console's is `/monitoring`).
    #[test]
    fn no_console_path_is_an_api_path() {
        let api = crate::admin::routes();
        for rule in pages().rules() {
            assert!(!api.rules().iter().any(|r| r.path == rule.path), "{} is the API's", rule.path);
            assert!(!rule.path.starts_with("/v1/"), "{} is under the API's prefix", rule.path);
        }
    }
}
