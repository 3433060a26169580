#!/usr/bin/env bash
# Packaging tests, run as root on a Debian-like machine (CI runs it after the unit tests):
# build the .deb and .rpm of both services, lint them, install the agent, check files,
# owners and modes, run it, upgrade it to a rebuilt package with a bumped version keeping a
# modified configuration and the agent's state, remove it (state kept), purge it (state
# gone), and verify and score the systemd units.
#
# Needs: cargo-deb, cargo-generate-rpm (cargo install), lintian, rpm, systemd, adduser.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "packaging/test.sh must run as root" >&2; exit 1; }

out=target/packages
rm -rf "$out" && mkdir -p "$out/upgrade"
# Start from a machine without the packages, and leave it so, whatever happens.
cleanup() {
    dpkg -P falaj-agent falaj-control > /dev/null 2>&1 || true
    rm -rf /var/lib/falaj-agent /var/lib/falaj-control
}
cleanup
trap cleanup EXIT
step() { printf '\n=== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_mode() { # path mode owner:group
    local got
    got="$(stat -c '%a %U:%G' "$1")"
    [ "$got" = "$2 $3" ] || fail "$1 is '$got', expected '$2 $3'"
}

step "build"
# The binaries packaged: the release profile's, unless FALAJ_PACKAGE_PROFILE names another.
# CI names `dev`, the binaries its test run has just built: what this tests is the packaging
# (files, owners, units, upgrade, purge), not the optimiser, and it saves CI a whole release
# build. Releases are built with `--profile dist` (INSTALL.md). `--fast` and gzip because
# these packages are thrown away: xz at its default level took 1m43s for each .deb, zstd
# about 2 minutes for each .rpm; the whole test now takes about 3 minutes here.
profile="${FALAJ_PACKAGE_PROFILE:-release}"
# Cargo writes the dev profile's binaries under target/debug, every other under its name.
bin_dir="target/$profile"
[ "$profile" = dev ] && bin_dir=target/debug
cargo build --profile "$profile" --workspace --bins
cargo deb -p falaj-agent --profile "$profile" --no-build --fast --output "$out/"
cargo deb -p falaj-control --profile "$profile" --no-build --fast --output "$out/"
cargo deb -p falaj-agent --profile "$profile" --no-build --fast --deb-version 0.1.1 --output "$out/upgrade/"
cargo generate-rpm -p agent --profile "$profile" --payload-compress gzip -o "$out/"
cargo generate-rpm -p control-plane --profile "$profile" --payload-compress gzip -o "$out/"
ls -l "$out" "$out/upgrade"
agent_deb="$(ls "$out"/falaj-agent_*.deb)"
control_deb="$(ls "$out"/falaj-control_*.deb)"
upgrade_deb="$(ls "$out"/upgrade/falaj-agent_*.deb)"

step "lintian"
for deb in "$agent_deb" "$control_deb"; do
    lintian --fail-on error,warning --info "$deb"
done

step "rpm metadata and file lists"
for rpm_file in "$out"/*.rpm; do
    rpm -qpi "$rpm_file"
    rpm -qpl "$rpm_file" | tee "$out/files.txt"
    grep -q '^/usr/bin/falaj-' "$out/files.txt" || fail "$rpm_file lacks its binary"
    grep -q '^/usr/lib/systemd/system/falaj-' "$out/files.txt" || fail "$rpm_file lacks its unit"
    rpm -qp --configfiles "$rpm_file" | grep '^/etc/falaj/' > /dev/null || fail "$rpm_file: config not marked"
done

step "install the agent"
dpkg -i "$agent_deb"
expect_mode /usr/bin/falaj-agent 755 root:root
expect_mode /etc/falaj/agent.toml 644 root:root
expect_mode /var/lib/falaj-agent 700 falaj-agent:falaj-agent
unit="$(dpkg -L falaj-agent | grep '/systemd/system/falaj-agent.service$')"
expect_mode "$unit" 644 root:root
getent passwd falaj-agent | grep nologin > /dev/null || fail "falaj-agent has a login shell"
falaj-agent --version | grep '^falaj-agent 0.1.0$' > /dev/null || fail "version"
falaj-agent check-config | grep 'agent.toml: OK' > /dev/null || fail "check-config on the shipped file"

step "a broken configuration is refused with exit 78, naming the key"
printf '[http]\nlisen = "0.0.0.0:1"\n' > /tmp/broken-agent.toml
set +e
falaj-agent check-config --config /tmp/broken-agent.toml 2> /tmp/broken.txt
code=$?
set -e
[ "$code" -eq 78 ] || fail "check-config exit $code on a broken file"
grep -q 'lisen' /tmp/broken.txt || fail "the error does not name the key: $(cat /tmp/broken.txt)"

step "state: keys, a trust root and a bundle installed as the service user"
work="$(mktemp -d)"
chmod 755 "$work"
"$bin_dir/falaj" control keys init --dir "$work/keys" --region pkg-test-1
"$bin_dir/falaj" control sample --out "$work/sample" --rows 1000
"$bin_dir/falaj" control bundle build --keys "$work/keys" --model "$work/sample/model.onnx" \
    --name sensor-fault --version 1 --out "$work/sensor-fault-1.falaj"
chmod -R a+rX "$work"
runuser -u falaj-agent -- falaj-agent init --region pkg-test-1 --trust "$work/keys/root.json"
runuser -u falaj-agent -- falaj-agent import "$work/sensor-fault-1.falaj"
runuser -u falaj-agent -- falaj-agent list | grep '^sensor-fault' > /dev/null || fail "bundle not listed"
expect_mode /var/lib/falaj-agent/agent.db 600 falaj-agent:falaj-agent
# Encryption at rest: the device key made at init, owner only; the bundle is sealed; the
# unit shows the credential line (commented, so this host without one still starts).
expect_mode /var/lib/falaj-agent/device.key 600 falaj-agent:falaj-agent
runuser -u falaj-agent -- falaj-agent keys status | grep 'sealed under it: 1' > /dev/null \
    || fail "keys status does not show the sealed bundle"
grep -q '^#LoadCredentialEncrypted=falaj-device-key:' "$unit" || fail "the unit lacks the credential line"

step "upgrade keeps a modified configuration and the state"
sed -i 's/^# listen = "127.0.0.1:8000"/listen = "127.0.0.1:8123"/' /etc/falaj/agent.toml
grep -q '^listen = "127.0.0.1:8123"' /etc/falaj/agent.toml || fail "could not modify the config"
dpkg -i "$upgrade_deb"
[ "$(dpkg-query -W -f='${Version}' falaj-agent)" = "0.1.1" ] || fail "not upgraded"
grep -q '^listen = "127.0.0.1:8123"' /etc/falaj/agent.toml || fail "upgrade replaced the modified config"
falaj-agent check-config | grep '127.0.0.1:8123' > /dev/null || fail "modified config not in effect"
runuser -u falaj-agent -- falaj-agent list | grep '^sensor-fault' > /dev/null || fail "upgrade lost the installed bundle"

step "serve as the service user, with the packaged configuration"
runuser -u falaj-agent -- falaj-agent serve > /tmp/serve.out 2>&1 &
server=$!
for _ in $(seq 1 100); do
    if curl -sf -o /dev/null http://127.0.0.1:8123/v2/models/sensor-fault/ready; then break; fi
    sleep 0.1
done
curl -sf http://127.0.0.1:8123/v2/models/sensor-fault | grep '"versions":\["1"\]' > /dev/null || fail "not serving: $(cat /tmp/serve.out)"
pkill -TERM -u falaj-agent -x falaj-agent
wait "$server" || fail "serve did not exit cleanly on SIGTERM"

step "remove keeps state and configuration; purge deletes them"
dpkg -r falaj-agent
[ ! -e /usr/bin/falaj-agent ] || fail "binary left after remove"
[ -f /etc/falaj/agent.toml ] || fail "remove deleted the configuration"
[ -f /var/lib/falaj-agent/agent.db ] || fail "remove deleted the state"
dpkg -P falaj-agent
[ ! -e /etc/falaj/agent.toml ] || fail "purge left the configuration"
[ ! -e /var/lib/falaj-agent ] || fail "purge left the state"

step "the control plane installs, and both units verify"
dpkg -i "$control_deb"
expect_mode /usr/bin/falaj-control 755 root:root
expect_mode /var/lib/falaj-control 700 falaj-control:falaj-control
falaj-control check-config | grep 'control.toml: OK' > /dev/null || fail "check-config on the shipped file"
dpkg -i "$agent_deb"
systemd-analyze verify "$(dpkg -L falaj-agent | grep 'falaj-agent.service$')" \
    "$(dpkg -L falaj-control | grep 'falaj-control.service$')"
for unit in falaj-agent falaj-control; do
    systemd-analyze security --offline=true "$(dpkg -L "$unit" | grep "$unit.service\$")" | tail -1
done
dpkg -P falaj-agent falaj-control
rm -rf "$work"
printf '\npackaging tests passed\n'
