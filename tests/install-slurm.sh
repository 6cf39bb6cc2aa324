#!/bin/sh
# Installs what the SLURM tests need (tests/slurm_cluster.py): Debian's slurmctld, slurmd,
# slurm-client and munge. Idempotent: does nothing when the binaries are already on PATH.
#
# Never starts a daemon: the tests start their own munged/slurmctld/slurmd on free ports and
# in temp dirs, and stop them by pid. A policy-rc.d that refuses every service start keeps the
# packages' postinst scripts from launching the Debian services (there is no systemd here
# anyway, but the munge postinst may still try its init script).
#
# Not root: prints what is missing and exits 0. The SLURM tests then skip, and CI's strict
# mode (ADVCAP_STRICT_TESTS=1, see tests/conftest.py) turns those skips into a failure.
set -eu

PACKAGES="slurmctld slurmd slurm-client munge"
# Debian installs the daemons under /usr/sbin, which a non-login root shell may lack on PATH.
PATH="$PATH:/usr/sbin:/sbin"

missing=""
for binary in slurmctld slurmd sbatch munged; do
    command -v "$binary" >/dev/null 2>&1 || missing="$missing $binary"
done
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-slurm: missing$missing; not root, so not installing." >&2
    echo "install-slurm: as root run: apt-get update && apt-get install -y --no-install-recommends $PACKAGES" >&2
    echo "install-slurm: the SLURM tests will be skipped (and fail under ADVCAP_STRICT_TESTS=1)." >&2
    exit 0
fi

echo "install-slurm: missing$missing; installing $PACKAGES" >&2
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by advcap tests/install-slurm.sh during the install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

export DEBIAN_FRONTEND=noninteractive
# Wait for a concurrent apt/dpkg (another install on this machine) instead of failing at once.
apt-get -o DPkg::Lock::Timeout=300 update -q
apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $PACKAGES

for binary in slurmctld slurmd sbatch munged; do
    if ! command -v "$binary" >/dev/null 2>&1; then
        echo "install-slurm: $binary still missing after the install" >&2
        exit 1
    fi
done
echo "install-slurm: done ($(slurmctld -V))" >&2
