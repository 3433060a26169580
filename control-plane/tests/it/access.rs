//! Who may do what on the admin API, against the real daemon on loopback and its SQLite
//! file: every declared route × every role (allowed or refused as the role table says),
//! 401 without credentials, sessions that expire or end, revoked and demoted API tokens,
//! disabled users, wrong passwords and lockouts (each audited), an operator unable to mint
//! an admin token, and the command line's login, stored session and fallbacks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use falaj_control::admin;
use falaj_control::auth::{Access, Permission, Role};
use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::state::Shared;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

struct Daemon {
    shared: Arc<Shared>,
    url: String,
    admin_token: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn daemon(dir: &Path, configure: impl FnOnce(&mut ServeConfig)) -> Daemon {
    let mut config = ServeConfig::new(dir);
    config.quic = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some("eu-west-1".into());
    configure(&mut config);
    let control = ControlPlane::start(config).await.unwrap();
    let url = format!("http://{}", control.admin_addr());
    let (admin_token, shared) = (control.admin_token().to_owned(), control.shared());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(control.run(async { drop(stopped.await) }));
    Daemon { shared, url, admin_token, http: reqwest::Client::new(), _stop: stop }
}

/// An answer: status and JSON body (null when there is none).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl Daemon {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: &Value) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if !body.is_null() {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null) }
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Answer {
        let token = self.admin_token.clone();
        self.call(method, path, Some(&token), &body).await
    }

    async fn add_user(&self, name: &str, role: Role) {
        let added = self
            .admin(
                Method::POST,
                "/v1/users",
                json!({"name": name, "role": role.name(), "password": PASSWORD}),
            )
            .await;
        assert_eq!(added.status, StatusCode::CREATED, "{added:?}");
    }

    async fn login(&self, user: &str, password: &str) -> Answer {
        self.call(Method::POST, "/v1/login", None, &json!({"user": user, "password": password}))
            .await
    }

    async fn session(&self, user: &str) -> String {
        self.session_with(user, PASSWORD).await
    }

    async fn session_with(&self, user: &str, password: &str) -> String {
        let login = self.login(user, password).await;
        assert_eq!(login.status, StatusCode::OK, "{login:?}");
        login.body["token"].as_str().unwrap().to_owned()
    }

    async fn whoami(&self, token: &str) -> Answer {
        self.call(Method::GET, "/v1/whoami", Some(token), &Value::Null).await
    }

    async fn sql(&self, sql: &'static str) {
        self.shared.db.call(move |c| c.execute_batch(sql)).await.unwrap();
    }

    /// Audit entries as (actor, action, target, outcome, line), oldest first.
    async fn audit(&self) -> Vec<(String, String, String, String, String)> {
        self.shared
            .db
            .call(|c| {
                let mut stmt = c.prepare(
                    "SELECT actor, action, target, outcome, line FROM audit ORDER BY seq",
                )?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                    .collect()
            })
            .await
            .unwrap()
    }

    async fn audited(&self, actor: &str, action: &str, outcome: &str) -> Vec<String> {
        self.audit()
            .await
            .into_iter()
            .filter(|e| e.0 == actor && e.1 == action && e.3 == outcome)
            .map(|e| e.4)
            .collect()
    }
}

/// A concrete path for a routed one: every `{param}` becomes `nosuch`.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|part| if part.starts_with('{') { "nosuch" } else { part })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every route × every role, each role calling with an API token of that role: allowed
/// routes are reached (whatever the handler then says of the empty request), refused
/// ones answer 403 naming the role and the permission, and each refusal is audited.
#[tokio::test]
async fn every_route_admits_exactly_the_roles_that_hold_its_permission() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |_| {}).await;
    let rules = admin::routes().rules().to_vec();
    let public: Vec<_> = rules.iter().filter(|r| r.access == Access::Public).collect();
    let public: Vec<_> = public.iter().map(|r| (r.method.as_str(), r.path)).collect();
    assert_eq!(public, [("GET", "/v1/health"), ("GET", "/metrics"), ("POST", "/v1/login")]);
    // Every permission guards some route; the audit routes need read_audit.
    for p in Permission::ALL {
        assert!(rules.iter().any(|r| r.access == Access::Requires(p)), "no route needs {p}");
    }
    for path in ["/v1/audit", "/v1/audit/export", "/v1/audit/key"] {
        let rule = rules.iter().find(|r| r.path == path && r.method == Method::GET).unwrap();
        assert_eq!(rule.access, Access::Requires(Permission::ReadAudit), "{path}");
    }

    let mut tokens = BTreeMap::new();
    for role in Role::ALL {
        let created = d
            .admin(
                Method::POST,
                "/v1/apitokens",
                json!({"name": format!("matrix-{role}"), "role": role.name(), "ttl_seconds": 3600}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        tokens.insert(role, created.body["token"].as_str().unwrap().to_owned());
    }

    let mut refusals = 0;
    for rule in &rules {
        let path = concrete(rule.path);
        let body =
            if matches!(rule.method, Method::POST | Method::PUT) { json!({}) } else { Value::Null };
        // The route exists as declared: the admin token reaches its handler.
        let reached = d.admin(rule.method.clone(), &path, body.clone()).await;
        assert!(
            reached.status != StatusCode::METHOD_NOT_ALLOWED
                && reached.message() != "no such endpoint"
                && !matches!(reached.status.as_u16(), 401 | 403 | 500),
            "{} {path}: {reached:?}",
            rule.method
        );
        // Without credentials: 401, unless public.
        let anonymous = d.call(rule.method.clone(), &path, None, &body).await;
        match rule.access {
            Access::Public => {
                assert!(!matches!(anonymous.status.as_u16(), 401 | 403), "{path}: {anonymous:?}");
            }
            Access::Requires(_) => {
                assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{path}: {anonymous:?}");
                assert_eq!(anonymous.code(), "unauthorized");
            }
        }
        for (role, token) in &tokens {
            let answer = d.call(rule.method.clone(), &path, Some(token), &body).await;
            if rule.access.admits(*role) {
                assert!(
                    !matches!(answer.status.as_u16(), 401 | 403),
                    "{role} is refused {} {path}: {answer:?}",
                    rule.method
                );
            } else {
                let Access::Requires(permission) = rule.access else { unreachable!() };
                assert_eq!(answer.status, StatusCode::FORBIDDEN, "{role} {} {path}", rule.method);
                assert_eq!(answer.code(), "forbidden");
                let message = answer.message();
                assert!(
                    message.contains(&format!("role {role}"))
                        && message.contains(&format!("permission {permission}")),
                    "{message}"
                );
                refusals += 1;
            }
        }
    }
    assert!(refusals > 40, "{refusals}");
    // Each refusal is in the audit log: the permission as action, the path as target.
    let refused: Vec<_> = d
        .audit()
        .await
        .into_iter()
        .filter(|e| e.3 == "refused" && e.0.starts_with("token:matrix-"))
        // (Refused bundles are audited as `push`; authorisation's refusals by permission.)
        .filter(|e| Permission::ALL.iter().any(|p| p.name() == e.1))
        .collect();
    assert_eq!(refused.len(), refusals, "{refused:#?}");
    assert!(
        refused.iter().any(|e| e.0 == "token:matrix-viewer"
            && e.1 == "deploy"
            && e.2 == "/v1/groups/{group}/deployments/{name}"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn sessions_end_by_logout_idleness_age_reset_or_disabling() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |_| {}).await;
    d.add_user("alice", Role::Operator).await;

    // A session acts as its user.
    let token = d.session("alice").await;
    let me = d.whoami(&token).await;
    assert_eq!(
        (me.body["actor"].as_str(), me.body["role"].as_str()),
        (Some("user:alice"), Some("operator"))
    );
    let logins = d.audited("user:alice", "auth.login", "success").await;
    assert_eq!(logins.len(), 1);
    assert!(logins[0].contains("127.0.0.1"), "the source address is recorded: {}", logins[0]);

    // Logout ends it.
    assert_eq!(
        d.call(Method::POST, "/v1/logout", Some(&token), &Value::Null).await.status,
        StatusCode::OK
    );
    let after = d.whoami(&token).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert!(after.message().contains("ended"), "{after:?}");
    assert_eq!(d.audited("user:alice", "auth.logout", "success").await.len(), 1);
    // The refused use of the ended session is audited as alice's.
    assert_eq!(d.audited("user:alice", "own_session", "refused").await.len(), 1);

    // Unused for longer than session_idle (12 h): expired.
    let token = d.session("alice").await;
    assert_eq!(d.whoami(&token).await.status, StatusCode::OK);
    d.sql("UPDATE sessions SET last_used = last_used - 13 * 3600").await;
    let idle = d.whoami(&token).await;
    assert_eq!(idle.status, StatusCode::UNAUTHORIZED);
    assert!(idle.message().contains("without use"), "{idle:?}");

    // Used all along but older than session_max (7 days): ended.
    let token = d.session("alice").await;
    d.sql("UPDATE sessions SET created_at = created_at - 8 * 86400").await;
    let old = d.whoami(&token).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    assert!(old.message().contains("reached its end"), "{old:?}");

    // A role change applies to live sessions at once.
    let token = d.session("alice").await;
    let set = d.admin(Method::PUT, "/v1/users/alice/role", json!({"role": "viewer"})).await;
    assert_eq!(set.body["previous"], "operator");
    let deploy = d
        .call(Method::PUT, "/v1/groups/g/deployments/m", Some(&token), &json!({"version": 1}))
        .await;
    assert_eq!(deploy.status, StatusCode::FORBIDDEN);
    assert!(deploy.message().contains("role viewer"), "{deploy:?}");

    // A password reset ends the sessions; the old password no longer works.
    let reset = d.admin(Method::POST, "/v1/users/alice/password", json!({})).await;
    let new_password = reset.body["password"].as_str().unwrap().to_owned();
    assert_eq!(d.whoami(&token).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(d.login("alice", PASSWORD).await.status, StatusCode::UNAUTHORIZED);
    let token = d.session_with("alice", &new_password).await;

    // A disabled user's session is refused, and so is its login, even with the password.
    assert_eq!(
        d.admin(Method::POST, "/v1/users/alice/disable", Value::Null).await.status,
        StatusCode::OK
    );
    let disabled = d.whoami(&token).await;
    assert_eq!(disabled.status, StatusCode::UNAUTHORIZED);
    let login = d.login("alice", &new_password).await;
    assert_eq!((login.status, login.code()), (StatusCode::UNAUTHORIZED, "disabled"));
    assert!(login.message().contains("alice is disabled"), "{login:?}");
    assert_eq!(
        d.audited("user:alice", "user.disable", "success").await.len(),
        0,
        "the admin token disabled alice"
    );
    assert_eq!(d.audited("admin-token", "user.disable", "success").await.len(), 1);
    d.admin(Method::POST, "/v1/users/alice/enable", Value::Null).await;
    assert_eq!(d.login("alice", &new_password).await.status, StatusCode::OK);

    // A removed user is gone, its sessions with it.
    let token = d.session_with("alice", &new_password).await;
    assert_eq!(
        d.admin(Method::DELETE, "/v1/users/alice", Value::Null).await.status,
        StatusCode::OK
    );
    assert_eq!(d.whoami(&token).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        d.admin(Method::DELETE, "/v1/users/alice", Value::Null).await.status,
        StatusCode::NOT_FOUND
    );

    // No credentials, or a credential nobody issued.
    assert_eq!(
        d.call(Method::GET, "/v1/status", None, &Value::Null).await.status,
        StatusCode::UNAUTHORIZED
    );
    let forged = d.whoami("falaj_s_0000").await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    // The removed user's session and the forged one.
    assert_eq!(d.audited("anonymous", "own_session", "refused").await.len(), 2);
}

#[tokio::test]
async fn wrong_passwords_are_audited_and_lock_the_user_then_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |c| {
        c.auth.logins.failures = 3;
        c.auth.logins.address_failures = 6;
    })
    .await;
    d.add_user("bob", Role::Viewer).await;
    d.add_user("carol", Role::Viewer).await;

    // A wrong password: 401, audited as a failure by the user claimed, without the password.
    let wrong = d.login("bob", "not the password at all").await;
    assert_eq!((wrong.status, wrong.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(wrong.message(), "wrong user name or password");
    let failures = d.audited("user:bob", "auth.login", "failure").await;
    assert_eq!(failures.len(), 1);
    assert!(failures[0].contains("wrong password"), "{}", failures[0]);
    assert!(!failures[0].contains("not the password"), "{}", failures[0]);
    // An unknown user reads the same to the caller; the log says why.
    let unknown = d.login("mallory", "whatever it is now").await;
    assert_eq!(unknown.message(), "wrong user name or password");
    assert!(d.audited("user:mallory", "auth.login", "failure").await[0].contains("unknown user"));

    // The third failure of bob locks bob: even the right password is refused, audited.
    d.login("bob", "still not the password").await;
    let third = d.login("bob", "nor is this the password").await;
    assert_eq!(
        (third.status, third.code()),
        (StatusCode::TOO_MANY_REQUESTS, "locked"),
        "{third:?}"
    );
    assert_eq!(d.audited("user:bob", "auth.lockout", "refused").await.len(), 1);
    let locked = d.login("bob", PASSWORD).await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.message().contains("for this user"), "{locked:?}");
    let refused = d.audited("user:bob", "auth.login", "failure").await;
    assert!(refused.last().unwrap().contains("locked (user)"), "{refused:?}");
    // Other users log in from the same address meanwhile.
    assert_eq!(d.login("carol", PASSWORD).await.status, StatusCode::OK);

    // Once the lockout has passed (the failures moved back past it), bob logs in; his
    // failures before that login no longer count towards his lockout.
    d.sql("UPDATE login_failures SET at = at - 16 * 60 WHERE user = 'bob'").await;
    assert_eq!(d.login("bob", PASSWORD).await.status, StatusCode::OK);
    d.sql("UPDATE login_failures SET at = at + 2 * 60 WHERE user = 'bob'").await;
    assert_eq!(d.login("bob", PASSWORD).await.status, StatusCode::OK);

    // Six failures from one address within the window (bob's three, mallory's and two
    // more), whichever users they name, lock the address.
    let fifth = d.login("u1", "guess number one!").await;
    assert_eq!(fifth.status, StatusCode::UNAUTHORIZED, "{fifth:?}");
    let sixth = d.login("u2", "guess number one!").await;
    assert_eq!(sixth.status, StatusCode::TOO_MANY_REQUESTS, "{sixth:?}");
    let address = d.login("carol", PASSWORD).await;
    assert_eq!(address.status, StatusCode::TOO_MANY_REQUESTS, "{address:?}");
    assert!(address.message().contains("from this address"), "{address:?}");
    let lockouts: Vec<_> = d
        .audit()
        .await
        .into_iter()
        .filter(|e| e.1 == "auth.lockout" && e.2 == "address:127.0.0.1")
        .collect();
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
}

#[tokio::test]
async fn api_tokens_are_never_above_their_creator_and_die_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |_| {}).await;
    d.add_user("olga", Role::Operator).await;
    d.add_user("vera", Role::Viewer).await;
    let olga = d.session("olga").await;
    let create =
        |role: &str, name: &str| json!({"name": name, "role": role, "ttl_seconds": 86_400});

    // An operator cannot mint an admin token, nor an auditor's; it can mint its own role
    // and below. Each refusal is audited.
    let admin = d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("admin", "ci")).await;
    assert_eq!(admin.status, StatusCode::FORBIDDEN);
    assert!(admin.message().contains("never more powerful than its creator"), "{admin:?}");
    let auditor =
        d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("auditor", "ci")).await;
    assert_eq!(auditor.status, StatusCode::FORBIDDEN);
    assert_eq!(d.audited("user:olga", "manage_api_tokens", "refused").await.len(), 2);
    let ci = d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("operator", "ci")).await;
    assert_eq!(ci.status, StatusCode::CREATED, "{ci:?}");
    let ci = ci.body["token"].as_str().unwrap().to_owned();
    assert!(ci.starts_with("falaj_t_"));
    // Shown once: the list has no secrets.
    let listed = d.admin(Method::GET, "/v1/apitokens", Value::Null).await;
    assert_eq!(listed.body[0]["name"], "ci");
    assert_eq!(listed.body[0]["created_by"], "user:olga");
    assert!(!listed.body.to_string().contains(&ci));
    // The name is taken while the token lives.
    let again = d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("viewer", "ci")).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    // A viewer has no API tokens at all.
    let vera = d.session("vera").await;
    let viewer = d.call(Method::POST, "/v1/apitokens", Some(&vera), &create("viewer", "v")).await;
    assert_eq!(viewer.status, StatusCode::FORBIDDEN);

    // The token acts as itself, with its role.
    let me = d.whoami(&ci).await;
    assert_eq!(
        (me.body["actor"].as_str(), me.body["role"].as_str()),
        (Some("token:ci"), Some("operator"))
    );
    // API tokens do not mint API tokens.
    let minted = d.call(Method::POST, "/v1/apitokens", Some(&ci), &create("viewer", "child")).await;
    assert_eq!(minted.status, StatusCode::FORBIDDEN);
    assert!(minted.message().contains("API tokens cannot create API tokens"), "{minted:?}");

    // Demoting the creator below the token's role stops the token.
    d.admin(Method::PUT, "/v1/users/olga/role", json!({"role": "viewer"})).await;
    let demoted = d.whoami(&ci).await;
    assert_eq!(demoted.status, StatusCode::UNAUTHORIZED);
    assert!(demoted.message().contains("above its creator"), "{demoted:?}");
    d.admin(Method::PUT, "/v1/users/olga/role", json!({"role": "operator"})).await;
    assert_eq!(d.whoami(&ci).await.status, StatusCode::OK);

    // Only its creator or an admin revokes it.
    d.add_user("otto", Role::Operator).await;
    let otto = d.session("otto").await;
    let other = d.call(Method::DELETE, "/v1/apitokens/ci", Some(&otto), &Value::Null).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN, "{other:?}");
    let revoked = d.call(Method::DELETE, "/v1/apitokens/ci", Some(&olga), &Value::Null).await;
    assert_eq!(revoked.status, StatusCode::OK);
    let used = d.whoami(&ci).await;
    assert_eq!(used.status, StatusCode::UNAUTHORIZED);
    assert!(used.message().contains("API token ci was revoked"), "{used:?}");
    // Refused twice: demoted, then revoked.
    assert_eq!(d.audited("token:ci", "own_session", "refused").await.len(), 2);
    assert_eq!(d.audited("user:olga", "apitoken.revoke", "success").await.len(), 1);

    // An expired token is refused; removing a user revokes the tokens it made.
    let short =
        d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("viewer", "short")).await;
    let short = short.body["token"].as_str().unwrap().to_owned();
    d.sql("UPDATE api_tokens SET expires_at = created_at WHERE name = 'short'").await;
    let expired = d.whoami(&short).await;
    assert!(expired.message().contains("expired"), "{expired:?}");
    let kept = d.call(Method::POST, "/v1/apitokens", Some(&olga), &create("viewer", "kept")).await;
    let kept = kept.body["token"].as_str().unwrap().to_owned();
    d.admin(Method::DELETE, "/v1/users/olga", Value::Null).await;
    d.add_user("olga", Role::Operator).await;
    assert_eq!(
        d.whoami(&kept).await.status,
        StatusCode::UNAUTHORIZED,
        "a new olga inherits nothing"
    );

    // Bad requests name the problem.
    let ttl = d
        .admin(
            Method::POST,
            "/v1/apitokens",
            json!({"name": "x", "role": "viewer", "ttl_seconds": 1}),
        )
        .await;
    assert!(ttl.message().contains("ttl_seconds"), "{ttl:?}");
    let role = d.admin(Method::POST, "/v1/users", json!({"name": "x", "role": "root"})).await;
    assert!(role.message().contains("unknown role \"root\""), "{role:?}");
    let name =
        d.admin(Method::POST, "/v1/users", json!({"name": "Bad Name", "role": "viewer"})).await;
    assert!(name.message().starts_with("user name"), "{name:?}");
    let weak = d
        .admin(
            Method::POST,
            "/v1/users",
            json!({"name": "x", "role": "viewer", "password": "short"}),
        )
        .await;
    assert!(weak.message().contains("password must be"), "{weak:?}");
}

/// The command line: `user add` through the admin token, `login` storing a private
/// session that later commands use for that URL, `logout` forgetting it (the admin token
/// again), and `apitoken create` printing a token that works.
#[tokio::test]
async fn the_command_line_logs_in_stores_the_session_and_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("control");
    let d = daemon(&data, |_| {}).await;
    let config = dir.path().join("config");
    let cli = |args: &[&str], stdin: &str| {
        let (url, data, config) = (d.url.clone(), data.clone(), config.clone());
        let (args, stdin) =
            (args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>(), stdin.to_owned());
        async move {
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_falaj-control"))
                .args(&args)
                .env("FALAJ_CONTROL_PLANE", &url)
                .env("FALAJ_CONTROL_DATA_DIR", &data)
                .env("XDG_CONFIG_HOME", &config)
                .env_remove("FALAJ_TOKEN")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes()).await.unwrap();
            drop(input);
            let out = child.wait_with_output().await.unwrap();
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        }
    };

    let (code, _, err) = cli(
        &["user", "add", "carol", "--role", "viewer", "--password-stdin"],
        &format!("{PASSWORD}\n"),
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = cli(&["user", "add", "dan", "--role", "operator"], "").await;
    assert_eq!(code, Some(0));
    let generated = out.trim().to_owned();
    assert_eq!(generated.len(), 29, "a one-time password: {out}");
    assert_eq!(d.login("dan", &generated).await.status, StatusCode::OK);
    let (_, out, _) = cli(&["user", "list"], "").await;
    assert!(out.lines().any(|l| l.starts_with("carol") && l.contains("viewer")), "{out}");

    // Wrong password: refused, nothing stored.
    let (code, _, err) =
        cli(&["login", "--user", "carol", "--password-stdin"], "wrong password here\n").await;
    assert_ne!(code, Some(0));
    assert!(err.contains("wrong user name or password"), "{err}");
    let session = config.join("falaj/session");
    assert!(!session.exists());

    let (code, out, err) =
        cli(&["login", "--user", "carol", "--password-stdin"], &format!("{PASSWORD}\n")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("as carol (viewer)"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&session), 0o600);
        assert_eq!(mode(session.parent().unwrap()), 0o700);
    }
    // The stored session is used before the admin token.
    let (_, out, _) = cli(&["whoami"], "").await;
    assert!(out.starts_with("user:carol (viewer)"), "{out}");
    let (code, _, err) = cli(&["deploy", "m@1", "--group", "g"], "").await;
    assert_ne!(code, Some(0));
    assert!(err.contains("role viewer, which lacks permission deploy"), "{err}");
    // --token comes first.
    let (_, out, _) = cli(&["whoami", "--token", &d.admin_token], "").await;
    assert!(out.starts_with("admin-token (admin)"), "{out}");
    // A session for another URL is not used.
    let (_, out, _) = cli(
        &["whoami", "--control-plane", &format!("{}/", d.url.replace("127.0.0.1", "localhost"))],
        "",
    )
    .await;
    assert!(out.starts_with("admin-token (admin)"), "{out}");

    let (code, out, _) = cli(&["logout"], "").await;
    assert_eq!(code, Some(0));
    assert!(out.contains("logged out"), "{out}");
    assert!(!session.exists());
    assert_eq!(d.audited("user:carol", "auth.logout", "success").await.len(), 1);
    let (_, out, _) = cli(&["whoami"], "").await;
    assert!(out.starts_with("admin-token (admin)"), "{out}");

    let (code, out, err) =
        cli(&["apitoken", "create", "--name", "ci", "--role", "operator", "--ttl", "30d"], "")
            .await;
    assert_eq!(code, Some(0), "{err}");
    let token = out.trim().to_owned();
    let (_, out, _) = cli(&["whoami", "--token", &token], "").await;
    assert!(out.starts_with("token:ci (operator)"), "{out}");
    let (_, out, _) = cli(&["apitoken", "list"], "").await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("ci") && l.contains("admin-token") && l.ends_with("live")),
        "{out}"
    );
    let (code, _, _) = cli(&["apitoken", "revoke", "ci"], "").await;
    assert_eq!(code, Some(0));
    let (code, _, err) = cli(&["whoami", "--token", &token], "").await;
    assert_ne!(code, Some(0));
    assert!(err.contains("was revoked"), "{err}");
    let (code, _, err) = cli(&["user", "add", "eve", "--role", "root"], "").await;
    assert_eq!(code, Some(64), "{err}");
}
