//! Routes with their access declared where they are added. [`Routes`] is the only way
//! the admin API's routes are built: each method of each path names its
//! [`Access`] (a permission, or public), the pair goes into a table, and
//! [`Routes::finish`] puts the [gate](super::gate) in front of every route. The gate
//! looks each request's matched route up in that table and refuses (500, logged as the
//! bug it is) a route that has no entry, so a route slipped in beside the table is closed,
//! never open. Tests enumerate the table ([`Routes::rules`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post, put};

use super::Access;
use crate::admin::{Api, ApiError};

/// One method of one route and what it requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The method (GET also answers HEAD).
    pub method: Method,
    /// The path as routed (`/v1/users/{name}`).
    pub path: &'static str,
    /// What it requires.
    pub access: Access,
}

/// The table the gate reads: access by path, then method.
#[derive(Debug, Default)]
pub(crate) struct Table(BTreeMap<&'static str, BTreeMap<String, Access>>);

/// What the table says of a request's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The route and method are declared.
    Declared(Access),
    /// The path is declared, not for this method.
    OtherMethods,
    /// Nothing is declared for the path.
    Undeclared,
}

impl Table {
    pub(crate) fn lookup(&self, method: &Method, path: &str) -> Lookup {
        let method = if method == Method::HEAD { &Method::GET } else { method };
        match self.0.get(path) {
            None => Lookup::Undeclared,
            Some(methods) => {
                methods.get(method.as_str()).map_or(Lookup::OtherMethods, |a| Lookup::Declared(*a))
            }
        }
    }
}

/// Routes of the admin API, each with its access.
#[derive(Debug)]
#[must_use]
pub struct Routes {
    router: Router<Api>,
    rules: Vec<Rule>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    /// No routes.
    pub fn new() -> Self {
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
        self.rules.push(Rule { method, path, access });
        self.router = self.router.route(path, route);
        self
    }

    /// `GET path` (and HEAD), requiring `access`.
    pub fn get<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::GET, path, access.into(), get(handler))
    }

    /// `POST path`, requiring `access`.
    pub fn post<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::POST, path, access.into(), post(handler))
    }

    /// `PUT path`, requiring `access`.
    pub fn put<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::PUT, path, access.into(), put(handler))
    }

    /// `DELETE path`, requiring `access`.
    pub fn delete<H: Handler<T, Api>, T: 'static>(
        self,
        path: &'static str,
        access: impl Into<Access>,
        handler: H,
    ) -> Self {
        self.add(Method::DELETE, path, access.into(), delete(handler))
    }

    /// These routes and `other`'s.
    pub fn merge(mut self, other: Routes) -> Self {
        for rule in &other.rules {
            assert!(
                !self.rules.iter().any(|r| r.method == rule.method && r.path == rule.path),
                "{} {} is declared twice",
                rule.method,
                rule.path
            );
        }
        self.rules.extend(other.rules);
        self.router = self.router.merge(other.router);
        self
    }

    /// Every route and what it requires, in the order declared.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The router: every route behind the gate, a JSON 404 for the rest.
    pub fn finish(self, api: Api) -> Router {
        let mut table = Table::default();
        for rule in &self.rules {
            table.0.entry(rule.path).or_default().insert(rule.method.to_string(), rule.access);
        }
        let gate = super::gate::Gate { api: api.clone(), table: Arc::new(table) };
        self.router
            .layer(axum::middleware::from_fn_with_state(gate, super::gate::check))
            .fallback(|| async { ApiError::not_found("no such endpoint") })
            .with_state(api)
    }

    /// The router without the gate's table entry for one extra route: for the test that
    /// shows such a route is refused.
    #[cfg(test)]
    pub(crate) fn with_undeclared(mut self, path: &'static str) -> Self {
        self.router = self.router.route(path, get(|| async { "open" }));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Permission;

    #[test]
    fn the_table_answers_by_method_and_head_as_get() {
        let mut table = Table::default();
        table.0.entry("/v1/x").or_default().insert("GET".into(), Permission::ReadFleet.into());
        assert_eq!(
            table.lookup(&Method::GET, "/v1/x"),
            Lookup::Declared(Access::Requires(Permission::ReadFleet))
        );
        assert_eq!(
            table.lookup(&Method::HEAD, "/v1/x"),
            Lookup::Declared(Access::Requires(Permission::ReadFleet))
        );
        assert_eq!(table.lookup(&Method::POST, "/v1/x"), Lookup::OtherMethods);
        assert_eq!(table.lookup(&Method::GET, "/v1/y"), Lookup::Undeclared);
    }

    /// A route added to the router beside the table (as a careless `.route()` would) is
    /// refused for everyone, the admin token included, while declared ones work.
    #[tokio::test]
    async fn a_route_without_declared_access_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::daemon::ServeConfig::new(dir.path());
        config.quic = "127.0.0.1:0".parse().unwrap();
        config.admin = "127.0.0.1:0".parse().unwrap();
        config.region = Some("eu-west-1".into());
        let control = crate::daemon::ControlPlane::start(config).await.unwrap();
        let token = control.admin_token().to_owned();
        let router = crate::admin::routes().with_undeclared("/v1/sneaky").finish(control.api());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, service).await });
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).bearer_auth(&token).send();
        assert_eq!(get("/v1/sneaky").await.unwrap().status(), 500);
        assert_eq!(get("/v1/status").await.unwrap().status(), 200);
        assert_eq!(get("/v1/nowhere").await.unwrap().status(), 404);
        let post = http.post(format!("http://{addr}/v1/status")).bearer_auth(&token).send();
        assert_eq!(post.await.unwrap().status(), 405);
    }

    #[test]
    #[should_panic(expected = "GET /v1/status is declared twice")]
    fn a_route_declared_twice_is_a_bug_found_at_start() {
        let _ = crate::admin::routes().merge(Routes::new().get(
            "/v1/status",
            Access::Public,
            || async { "" },
        ));
    }
}
