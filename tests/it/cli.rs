//! The control plane's CLI output is accepted by the agent's CLI, and the agent's CLI
//! refuses what it must, with the exit codes operators script against.

use crate::support;

use support::{fails, init_agent, ok, s, sample_bundle};

#[test]
fn control_plane_output_is_accepted_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path(), "eu-west-1", 1);
    let keys = dir.path().join("keys");
    let root = keys.join("root.json");

    // Private keys are 0600 and the directory 0700.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys), 0o700);
        let key_files: Vec<_> = std::fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "key"))
            .collect();
        assert_eq!(key_files.len(), 2, "one root key and one signing key");
        for key in key_files {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
    }

    let report = ok(&["control", "bundle", "inspect", s(&bundle), "--trust", s(&root)]);
    assert!(report.contains("name        sensor-fault"), "{report}");
    assert!(report.contains("input       sensors FP32 [N, 8]"), "{report}");
    assert!(report.contains("output      label INT64 [N]"), "{report}");
    assert!(report.contains("verified    yes"), "{report}");
    assert!(
        report.contains("reference   4000 rows; 8 input and 4 output column profiles"),
        "{report}"
    );
    let unchecked = ok(&["control", "bundle", "inspect", s(&bundle)]);
    assert!(unchecked.contains("not checked"), "{unchecked}");

    let agent = dir.path().join("agent");
    let init = init_agent(&agent, "eu-west-1", &root);
    assert!(init.contains("region eu-west-1"), "{init}");
    let imported = ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    assert!(imported.contains("installed sensor-fault version 1"), "{imported}");
    let again = ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    assert!(again.contains("already installed"), "{again}");
    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    assert!(list.lines().any(|l| l.starts_with("sensor-fault") && l.contains(" yes ")), "{list}");
}

#[test]
fn refusals_have_their_own_exit_codes_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path(), "eu-west-1", 2);
    let root = dir.path().join("keys/root.json");
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &root);
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);

    // A tampered copy: refused with EX_DATAERR, and inspect says why.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0xff;
    let tampered = dir.path().join("tampered.falaj");
    std::fs::write(&tampered, bytes).unwrap();
    let err = fails(&["agent", "import", s(&tampered), "--data-dir", s(&agent)], 65);
    assert!(err.contains("does not match its SHA-256"), "{err}");
    let err = fails(&["control", "bundle", "inspect", s(&tampered), "--trust", s(&root)], 65);
    assert!(err.contains("does not verify"), "{err}");

    // An older version needs --allow-downgrade.
    let older = sample_bundle(dir.path(), "eu-west-1", 1);
    let err = fails(&["agent", "import", s(&older), "--data-dir", s(&agent)], 65);
    assert!(err.contains("not newer than installed version 2"), "{err}");
    let rolled = ok(&["agent", "import", s(&older), "--data-dir", s(&agent), "--allow-downgrade"]);
    assert!(rolled.contains("was version 2"), "{rolled}");

    // A bundle from another control plane (other keys, other region).
    let other = tempfile::tempdir().unwrap();
    let foreign = sample_bundle(other.path(), "us-east-1", 3);
    let err = fails(&["agent", "import", s(&foreign), "--data-dir", s(&agent)], 65);
    assert!(err.contains("not a signing key of the trust root"), "{err}");

    // Configuration errors are EX_CONFIG: no agent here, a trust root for another region.
    let err =
        fails(&["agent", "import", s(&bundle), "--data-dir", s(&dir.path().join("none"))], 78);
    assert!(err.contains("not an initialised agent"), "{err}");
    let err = fails(
        &[
            "agent",
            "init",
            "--data-dir",
            s(&dir.path().join("x")),
            "--region",
            "ap-south-1",
            "--trust",
            s(&root),
        ],
        78,
    );
    assert!(err.contains("trust root is for region"), "{err}");
    // A usage error is EX_USAGE.
    fails(&["agent", "import"], 64);
    // Keys are never overwritten.
    let err = fails(
        &["control", "keys", "init", "--dir", s(&dir.path().join("keys")), "--region", "eu-west-1"],
        78,
    );
    assert!(err.contains("refusing to overwrite"), "{err}");
}

#[test]
fn bundle_build_refuses_models_tract_cannot_load() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"]);
    let model = dir.path().join("broken.onnx");
    std::fs::write(&model, b"not an onnx model at all").unwrap();
    let out = dir.path().join("b.falaj");
    let err = fails(
        &[
            "control",
            "bundle",
            "build",
            "--keys",
            s(&keys),
            "--model",
            s(&model),
            "--name",
            "broken",
            "--version",
            "1",
            "--out",
            s(&out),
        ],
        78,
    );
    assert!(err.contains("broken.onnx") && err.contains("not an ONNX model"), "{err}");
    assert!(!out.exists(), "nothing written for a refused model");
}

#[test]
fn an_air_gapped_site_removes_versions_it_no_longer_needs() {
    let dir = tempfile::tempdir().unwrap();
    let first = sample_bundle(dir.path(), "eu-west-1", 1);
    let second = sample_bundle(dir.path(), "eu-west-1", 2);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &dir.path().join("keys/root.json"));
    ok(&["agent", "import", s(&first), "--data-dir", s(&agent)]);
    ok(&["agent", "import", s(&second), "--data-dir", s(&agent)]);
    let err = fails(&["agent", "remove", "sensor-fault@2", "--data-dir", s(&agent)], 78);
    assert!(err.contains("sensor-fault@2 is the active version"), "{err}");
    let removed = ok(&["agent", "remove", "sensor-fault@1", "--data-dir", s(&agent)]);
    assert!(removed.contains("removed sensor-fault@1"), "{removed}");
    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    let versions: Vec<&str> = list.lines().filter(|l| l.starts_with("sensor-fault")).collect();
    assert_eq!(versions.len(), 1, "{list}");
    assert!(versions[0].contains(" 2 "), "{list}");
    let files = std::fs::read_dir(agent.join("bundles/sensor-fault")).unwrap().count();
    assert_eq!(files, 1, "the removed version's file is gone");
    let err = fails(&["agent", "remove", "sensor-fault@1", "--data-dir", s(&agent)], 78);
    assert!(err.contains("sensor-fault@1 is not installed"), "{err}");
    let err = fails(&["agent", "remove", "sensor-fault", "--data-dir", s(&agent)], 64);
    assert!(err.contains("expected NAME@VERSION"), "{err}");
}

/// Trust-root rotation on an air-gapped site: bundles signed by a new signing key are
/// refused until the agent takes the new root from a file; then they install, and a
/// bundle signed by the retired key no longer does. A root that skips a version, or an
/// older one, is refused and changes nothing.
#[test]
fn an_air_gapped_agent_follows_key_rotations_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let old_key_bundle = sample_bundle(dir.path(), "eu-west-1", 1);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &keys.join("root.json"));

    let rotated = ok(&["control", "keys", "rotate-root", "--keys", s(&keys)]);
    assert!(rotated.contains("trust root version 2 written"), "{rotated}");
    assert!(rotated.contains("retired"), "the old root key: {rotated}");
    let rotated = ok(&["control", "keys", "rotate-signing", "--keys", s(&keys)]);
    assert!(rotated.contains("trust root version 3 written"), "{rotated}");
    let status = ok(&["control", "keys", "status", "--keys", s(&keys)]);
    let kinds: Vec<&str> =
        status.lines().skip(1).filter_map(|l| l.split_whitespace().nth(2)).take(3).collect();
    assert_eq!(kinds, ["previous", "previous", "current"], "{status}");

    // Bundle version 2 is signed by the new signing key only.
    std::fs::rename(&old_key_bundle, dir.path().join("old-key.falaj")).unwrap();
    let new_key_bundle = sample_bundle(dir.path(), "eu-west-1", 2);
    let err = fails(&["agent", "import", s(&new_key_bundle), "--data-dir", s(&agent)], 65);
    assert!(err.contains("not a signing key of the trust root"), "{err}");

    let root = |v: u64| keys.join(format!("root.{v}.json"));
    let err = fails(&["agent", "trust", "update", s(&root(3)), "--data-dir", s(&agent)], 78);
    assert!(err.contains("version 3 cannot follow version 1"), "{err}");
    let shown = ok(&["agent", "trust", "show", "--data-dir", s(&agent)]);
    assert!(shown.starts_with("trust root version 1 "), "nothing taken: {shown}");

    let taken = ok(&[
        "agent",
        "trust",
        "update",
        s(&root(3)),
        s(&root(2)),
        s(&root(1)),
        "--data-dir",
        s(&agent),
    ]);
    assert!(taken.contains("took trust root version(s) 2, 3; now at version 3"), "{taken}");
    let again = ok(&["agent", "trust", "update", s(&root(2)), "--data-dir", s(&agent)]);
    assert!(again.contains("version 3 already held"), "{again}");

    let imported = ok(&["agent", "import", s(&new_key_bundle), "--data-dir", s(&agent)]);
    assert!(imported.contains("sensor-fault"), "{imported}");
    let old = dir.path().join("old-key.falaj");
    let err = fails(&["agent", "import", s(&old), "--data-dir", s(&agent)], 65);
    assert!(err.contains("not a signing key of the trust root"), "retired key: {err}");
}

/// A CA and a certificate for `127.0.0.1` signed by it, as PEM: (CA, certificate, key).
fn tls_pair(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// `curl` over HTTPS trusting `ca`: the HTTP status, or 0 when TLS fails.
fn curl_status(url: &str, ca: &std::path::Path, token: &str) -> u32 {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", s(ca)])
        .args(["-H", &format!("Authorization: Bearer {token}"), url])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// The admin API over HTTPS beside the loopback HTTP listener, as curl sees it; a renewed
/// certificate is taken on SIGHUP; files that do not load stop the start, named.
#[test]
fn the_admin_api_serves_https_and_reloads_its_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let (first_ca, cert, key) = tls_pair("first");
    for (name, pem) in [("ca1.pem", &first_ca), ("admin.pem", &cert), ("admin.key", &key)] {
        std::fs::write(tls.join(name), pem).unwrap();
    }
    let data = dir.path().join("data");
    let config = dir.path().join("control.toml");
    let write_config = |key_file: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nregion = \"eu-west-1\"\n[quic]\nlisten = \"127.0.0.1:0\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n\
                 tls_certificate = \"{}\"\ntls_key = \"{}\"\n",
                s(&data),
                s(&tls.join("admin.pem")),
                s(&tls.join(key_file))
            ),
        )
        .unwrap();
    };
    write_config("missing.key");
    let err = fails(&["control", "serve", "--config", s(&config)], 78);
    assert!(err.contains("TLS key") && err.contains("missing.key"), "{err}");

    write_config("admin.key");
    // Logging at info, to see the reload happen.
    let mut control = support::Process::start_logging(
        &["control", "serve", "--config", s(&config)],
        &[("RUST_LOG", "info")],
    );
    let line = control.wait_for("over HTTPS on");
    let url = line[line.find("https://").unwrap()..].trim().to_owned();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let agents = format!("{url}/v1/agents");
    assert_eq!(curl_status(&agents, &tls.join("ca1.pem"), token.trim()), 200);
    assert_eq!(curl_status(&agents, &tls.join("ca1.pem"), "wrong"), 401);
    // The CLI speaks HTTPS too: trusting the CA it is given, and not without it.
    let ca1 = tls.join("ca1.pem");
    let cli = ["control", "agents", "--control-plane", &url, "--token", token.trim()];
    let table = ok(&[&cli[..], &["--ca-cert", s(&ca1)]].concat());
    assert!(table.starts_with("AGENT "), "{table}");
    let err = fails(&cli, 1);
    assert!(err.contains(&format!("cannot reach the control plane at {url}")), "{err}");
    let plain = agents.replace("https://", "http://");
    assert_ne!(curl_status(&plain, &tls.join("ca1.pem"), token.trim()), 200, "no plain HTTP");
    // The console's cookies are Secure over HTTPS, and only there.
    let login_cookie = |url: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "--cacert", s(&tls.join("ca1.pem")), url])
            .output()
            .expect("curl runs");
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        head.lines().find(|l| l.starts_with("set-cookie:")).map(str::to_owned)
    };
    let secure = login_cookie(&format!("{url}/login")).expect("a login cookie over HTTPS");
    assert!(secure.trim_end().ends_with("; secure"), "{secure}");
    let admin_line = control.seen.iter().find(|l| l.contains("admin API on http://")).unwrap();
    let http = admin_line[admin_line.find("http://").unwrap()..].split_whitespace().next().unwrap();
    let plain_cookie = login_cookie(&format!("{http}/login")).expect("a login cookie over HTTP");
    assert!(!plain_cookie.contains("secure"), "{plain_cookie}");

    // A certificate from another CA, taken on SIGHUP (`systemctl reload`).
    let (second_ca, cert, key) = tls_pair("second");
    std::fs::write(tls.join("ca2.pem"), &second_ca).unwrap();
    std::fs::write(tls.join("admin.pem"), cert).unwrap();
    std::fs::write(tls.join("admin.key"), key).unwrap();
    let pid = control.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    control.wait_for("reloaded the admin API's TLS certificate");
    assert_eq!(curl_status(&agents, &tls.join("ca2.pem"), token.trim()), 200, "the new one");
    assert_eq!(curl_status(&agents, &tls.join("ca1.pem"), token.trim()), 0, "the old CA fails");
    assert_eq!(control.terminate(), Some(0));

    // The first start made the region's keys and the agents' CA, ten years long.
    let status = ok(&["control", "keys", "status", "--keys", s(&data.join("keys"))]);
    assert!(status.lines().nth(1).is_some_and(|l| l.contains(" current ")), "{status}");
    let ca = status.lines().find(|l| l.starts_with("agents' CA certificate expires 20"));
    assert!(ca.is_some() && !status.contains("WARNING"), "{status}");
}

/// The value of `name` on `url`'s `/metrics`.
fn metric(url: &str, name: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", &format!("{url}/metrics")])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
    value.unwrap_or_else(|| panic!("{name} missing:\n{text}")).to_owned()
}

/// A control plane whose keys are sealed starts with its passphrase typed on standard
/// input, and takes a rotation made while it runs on SIGHUP (`systemctl reload`), reading
/// the new sealed keys without asking again; a trust root that does not follow the one in
/// force (here, an older one put back) is refused on the next SIGHUP and changes nothing.
#[test]
fn a_running_control_plane_takes_a_rotation_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = data.join("keys");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"]);
    let passphrase = "a long and unguessable passphrase\n";
    let sealed = falaj_with(&["control", "keys", "seal", "--keys", s(&keys)], passphrase, &[]);
    assert!(sealed.status.success(), "{}", String::from_utf8_lossy(&sealed.stderr));

    let serve = ["control", "serve", "--data-dir", s(&data), "--quic", "127.0.0.1:0"];
    let serve = [&serve[..], &["--admin", "127.0.0.1:0", "--unseal-from", "stdin"]].concat();
    let mut control =
        support::Process::start_logging_with_input(&serve, &[("RUST_LOG", "info")], passphrase);
    control.wait_for("opened the sealed keys");
    // The address goes to stdout, the log to stderr: either is read first.
    let line = control.saw_or_wait_for("admin API on http://");
    let url = line[line.find("http://").unwrap()..].split_whitespace().next().unwrap().to_owned();
    assert_eq!(metric(&url, "falaj_trust_root_version"), "1");

    let rotate =
        ["control", "keys", "rotate-signing", "--keys", s(&keys), "--unseal-from", "stdin"];
    let rotated = falaj_with(&rotate, passphrase, &[]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let hangup = |pid: u32| {
        let pid = pid.to_string();
        assert!(
            std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success()
        );
    };
    hangup(control.pid());
    control.wait_for("took trust root version 2");
    assert_eq!(metric(&url, "falaj_trust_root_version"), "2");
    // The root keys are still on this host: said at start, and again after the rotation.
    control.wait_for("root keys are on the control plane's host");
    let said = control.seen.iter().filter(|l| l.contains("root keys are on the control plane's"));
    assert_eq!(said.count(), 2, "{:?}", control.seen);

    std::fs::copy(keys.join("root.1.json"), keys.join("root.json")).unwrap();
    hangup(control.pid());
    let refused = control.wait_for("trust root is refused");
    assert!(refused.contains("cannot follow version 2"), "{refused}");
    assert_eq!(metric(&url, "falaj_trust_root_version"), "2", "the keys in force stay");
    assert_eq!(control.terminate(), Some(0));
}

/// Root keys kept offline from the start: the daemon never holds them (no warning that it
/// does), warns in its log, `keys status` and `/metrics` while the trust root comes within
/// 30 days of its end, and takes its renewal (same root keys, brought from the offline
/// directory) on SIGHUP; the warning goes from `keys status`.
#[test]
fn an_expiring_root_warns_and_is_renewed_with_offline_root_keys_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let (data, offline) = (dir.path().join("data"), dir.path().join("usb"));
    let keys = data.join("keys");
    let init = ["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"];
    ok(&[&init[..], &["--expires-in", "20d", "--offline-root", s(&offline)]].concat());
    let root_key = |dir: &std::path::Path| {
        let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name());
        names.filter(|n| n.to_string_lossy().starts_with("root-")).count()
    };
    assert_eq!((root_key(&keys), root_key(&offline)), (0, 1), "the root key went offline");
    let status = ok(&["control", "keys", "status", "--keys", s(&keys)]);
    assert!(status.contains("WARNING: trust root version 1 expires within 30 days"), "{status}");

    let serve = ["control", "serve", "--data-dir", s(&data), "--quic", "127.0.0.1:0"];
    let serve = [&serve[..], &["--admin", "127.0.0.1:0"]].concat();
    let mut control = support::Process::start_logging(&serve, &[("RUST_LOG", "info")]);
    let line = control.wait_for("admin API on http://");
    let url = line[line.find("http://").unwrap()..].split_whitespace().next().unwrap().to_owned();
    // The warning goes to the log (stderr), the address to stdout: either is read first.
    control.saw_or_wait_for("trust root expires within 30 days");
    let left: u64 = metric(&url, "falaj_trust_root_expiry_seconds").parse().unwrap();
    assert!(left <= 20 * 86_400 && left > 19 * 86_400, "{left}");
    assert!(
        !control.seen.iter().any(|l| l.contains("root keys are on the control plane's host")),
        "{:?}",
        control.seen
    );

    let rotate = ["control", "keys", "rotate-root", "--keys", s(&keys), "--keep-keys"];
    let rotate = [&rotate[..], &["--root-keys-dir", s(&offline), "--expires-in", "2y"]].concat();
    let renewed = ok(&rotate);
    assert!(renewed.contains("trust root version 2 written"), "{renewed}");
    assert_eq!(root_key(&keys), 0, "still none on the host");
    let pid = control.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    control.wait_for("took trust root version 2");
    let left: u64 = metric(&url, "falaj_trust_root_expiry_seconds").parse().unwrap();
    assert!(left > 700 * 86_400, "{left}");
    assert_eq!(control.terminate(), Some(0));
    let status = ok(&["control", "keys", "status", "--keys", s(&keys)]);
    assert!(!status.contains("WARNING: trust root"), "{status}");
}

/// A passphrase typed at a terminal is asked for and not shown: `keys seal` run with its
/// standard input on a pseudo-terminal prompts on standard error, turns the terminal's
/// echo off while the line is typed (nothing comes back on the terminal) and on again,
/// and seals under what was typed.
#[test]
fn a_passphrase_typed_at_a_terminal_is_not_shown() {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use std::io::{BufRead as _, Read as _, Write as _};
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"]);

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))
        .unwrap();
    let mut child = std::process::Command::new(support::FALAJ)
        .args(["control", "keys", "seal", "--keys", s(&keys)])
        .env("RUST_LOG", "warn")
        .stdin(terminal)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Without a prompt the child would wait for its line for ever: stopped after a minute,
    // its standard error ends and the test fails below.
    let (done, watched) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        if watched.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
        }
    });
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut prompt = Vec::new();
    while !prompt.ends_with(b"(not shown): ") {
        let mut byte = [0u8];
        assert_eq!(stderr.read(&mut byte).unwrap(), 1, "no prompt: {prompt:?}");
        prompt.push(byte[0]);
    }
    let passphrase = "typed where no one may read it";
    let mut master = std::fs::File::from(master);
    master.write_all(format!("{passphrase}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // What the terminal shows: read once the child is gone (and its side closed).
    let mut shown = Vec::new();
    let nonblocking = rustix::fs::OFlags::NONBLOCK;
    rustix::fs::fcntl_setfl(&master, nonblocking).unwrap();
    let _ = master.read_to_end(&mut shown);
    let shown = String::from_utf8_lossy(&shown);
    assert!(!shown.contains(passphrase), "the terminal echoed it: {shown:?}");
    let mut rest = String::new();
    let _ = stderr.read_line(&mut rest);

    // Sealed under exactly what was typed.
    let rotate =
        ["control", "keys", "rotate-signing", "--keys", s(&keys), "--unseal-from", "stdin"];
    let rotated = falaj_with(&rotate, &format!("{passphrase}\n"), &[]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
}

/// A relative `--data-dir` means the same directory to every command, `serve` included.
#[test]
fn a_relative_data_dir_is_the_same_for_every_command() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path(), "eu-west-1", 1);
    let run = |args: &[&str]| {
        std::process::Command::new(support::FALAJ)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("falaj runs")
    };
    let init = run(&[
        "agent",
        "init",
        "--data-dir",
        "site/agent",
        "--region",
        "eu-west-1",
        "--trust",
        "keys/root.json",
    ]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let import = run(&["agent", "import", s(&bundle), "--data-dir", "site/agent"]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));

    let mut serve = std::process::Command::new(support::FALAJ)
        .args(["agent", "serve", "--data-dir", "site/agent", "--http", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(serve.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let _ = serve.kill();
    let ended = serve.wait_with_output().unwrap();
    assert!(
        first.starts_with("serving the Open Inference Protocol on http://"),
        "{first}{}",
        String::from_utf8_lossy(&ended.stderr)
    );

    // The control plane: its daemon and a command against it, both from the same
    // directory, find the same data (the command reads the admin token the daemon wrote).
    let mut control = std::process::Command::new(support::FALAJ)
        .args(["control", "serve", "--data-dir", "site/control", "--region", "eu-west-1"])
        .args(["--quic", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open until the end: the daemon goes on printing, and a closed pipe would stop it.
    let mut out = std::io::BufReader::new(control.stdout.take().unwrap());
    let (mut admin, mut quic) = (String::new(), String::new());
    out.read_line(&mut admin).unwrap();
    out.read_line(&mut quic).unwrap();
    let url = admin.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_owned);
    let agents = url.as_deref().map(|url| {
        run(&["control", "agents", "--control-plane", url, "--data-dir", "site/control"])
    });
    let _ = control.kill();
    let ended = control.wait_with_output().unwrap();
    drop(out);
    let log = String::from_utf8_lossy(&ended.stderr);
    let agents = agents.unwrap_or_else(|| panic!("no admin address in {admin:?}: {log}"));
    assert!(agents.status.success(), "{}", String::from_utf8_lossy(&agents.stderr));
    assert!(dir.path().join("site/control/admin.token").is_file(), "{log}");
}

/// Runs `falaj ARGS...` with `input` on standard input and extra environment variables.
fn falaj_with(args: &[&str], input: &str, env: &[(&str, &str)]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(support::FALAJ)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("falaj starts");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().expect("falaj runs")
}

/// Every file under `dir`, recursively, with its bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    found
}

/// `keys seal` leaves no private key in the clear anywhere under the data directory; the
/// daemon, `bundle build` and rotations then need the secret, from standard input, a
/// file or systemd's credential, and a wrong one is refused before anything starts.
#[test]
fn sealed_keys_never_lie_in_plaintext_and_open_only_with_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = data.join("keys");
    let serve = ["control", "serve", "--data-dir", s(&data), "--quic", "127.0.0.1:0"];
    let serve: Vec<&str> = serve.into_iter().chain(["--admin", "127.0.0.1:0"]).collect();

    // The first start makes the region's keys: signing, root, CA, audit, PII.
    let mut first: Vec<&str> = serve.clone();
    first.extend(["--region", "eu-west-1"]);
    let mut control = support::Process::start(&first);
    control.wait_for("admin API on");
    assert_eq!(control.terminate(), Some(0));
    let plain: Vec<(std::path::PathBuf, Vec<u8>)> = files_under(&keys)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "key"))
        .collect();
    let names: Vec<String> =
        plain.iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into()).collect();
    for prefix in ["signing-", "root-", "audit-", "ca.key", "pii-eu-west-1"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "{prefix} in {names:?}");
    }

    let passphrase = "a long and unguessable passphrase\n";
    let sealed = falaj_with(&["control", "keys", "seal", "--keys", s(&keys)], passphrase, &[]);
    let stdout = String::from_utf8_lossy(&sealed.stdout);
    assert!(sealed.status.success(), "{stdout}{}", String::from_utf8_lossy(&sealed.stderr));
    assert!(stdout.contains(&format!("{} key files sealed", plain.len())), "{stdout}");

    // No 32-byte stretch of any private key is left in any file of the data directory.
    for (key_path, key) in &plain {
        for (path, bytes) in files_under(&data) {
            let leaked = key.windows(32).step_by(8).any(|w| bytes.windows(32).any(|b| b == w));
            assert!(!leaked, "{} holds part of {}", path.display(), key_path.display());
        }
    }
    let status = ok(&["control", "keys", "status", "--keys", s(&keys)]);
    assert!(status.contains("private keys are sealed"), "{status}");

    // Without the secret, or with a wrong one, nothing starts.
    let err = fails(&serve, 78);
    assert!(err.contains("are sealed") && err.contains("--unseal-from"), "{err}");
    let mut from_stdin = serve.clone();
    from_stdin.extend(["--unseal-from", "stdin"]);
    let wrong = falaj_with(&from_stdin, "not the passphrase at all\n", &[]);
    assert_eq!(wrong.status.code(), Some(78));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("does not open") && err.contains("seal.json"), "{err}");

    // Bundles are signed with the sealed keys, given the secret.
    let sample = dir.path().join("sample");
    ok(&["control", "sample", "--out", s(&sample), "--rows", "500"]);
    let (bundle, model) = (dir.path().join("m.falaj"), sample.join("model.onnx"));
    let build = [
        "control",
        "bundle",
        "build",
        "--keys",
        s(&keys),
        "--model",
        s(&model),
        "--name",
        "m",
        "--version",
        "1",
        "--out",
        s(&bundle),
    ];
    let err = fails(&build, 78);
    assert!(err.contains("are sealed"), "{err}");
    let mut unsealing: Vec<&str> = build.to_vec();
    unsealing.extend(["--unseal-from", "stdin"]);
    let signed = falaj_with(&unsealing, passphrase, &[]);
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    let root = keys.join("root.json");
    let report = ok(&["control", "bundle", "inspect", s(&bundle), "--trust", s(&root)]);
    assert!(report.contains("verified    yes"), "{report}");

    // A new secret opens the same files; the old one no longer does.
    let secret_file = dir.path().join("new-secret");
    std::fs::write(&secret_file, "the passphrase after the change").unwrap();
    let rekey = format!("file:{}", s(&secret_file));
    let changed = falaj_with(
        &["control", "keys", "seal", "--keys", s(&keys), "--rekey", &rekey],
        passphrase,
        &[],
    );
    assert!(changed.status.success(), "{}", String::from_utf8_lossy(&changed.stderr));
    let old = falaj_with(&unsealing, passphrase, &[]);
    assert_eq!(old.status.code(), Some(78), "{}", String::from_utf8_lossy(&old.stderr));

    // Under systemd the secret is the unit's `falaj-keys` credential.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::copy(&secret_file, credentials.join("falaj-keys")).unwrap();
    let mut control =
        support::Process::start_with_env(&serve, &[("CREDENTIALS_DIRECTORY", s(&credentials))]);
    control.wait_for("admin API on");
    assert_eq!(control.terminate(), Some(0));
    // Keys the daemon made meanwhile are sealed too: still no key file in the clear.
    for (path, bytes) in files_under(&keys) {
        if path.extension().is_some_and(|e| e == "key") {
            assert!(bytes.starts_with(b"{\"sealed\""), "{} is sealed", path.display());
        }
    }
}
