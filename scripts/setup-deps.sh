#!/usr/bin/env bash
# Installs the Debian packages falcon-batch builds and tests against, by package name
# (`dpkg -s`, never a file glob: a fresh machine has libclang-cpp14 but not libclang,
# which bindgen needs), then checks that the libraries are where the build looks.
#   scripts/setup-deps.sh          build + test packages
#   scripts/setup-deps.sh --slurm  also the Slurm test cluster's packages
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev libhdf5-dev hdf5-tools libclang-dev pkg-config shellcheck
  iproute2 procps)
[ "${1:-}" = "--slurm" ] && packages+=(slurmctld slurmd slurm-client munge)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

need=()
for p in "${packages[@]}"; do installed "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup-deps: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  for p in "${need[@]}"; do
    installed "$p" || { echo "setup-deps: error: $p did not install" >&2; exit 1; }
    echo "setup-deps: installed $p $(dpkg-query -W -f='${Version}' "$p")"
  done
fi

# What the build itself looks for, checked where it looks.
fail=0
check() { if ! eval "$2" >/dev/null 2>&1; then echo "setup-deps: error: $1" >&2; fail=1; fi; }
check "bindgen (the mpi crate) needs libclang.so: none under \$(llvm-config --libdir) or /usr/lib/llvm-*/lib" \
  'ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-*.so.1 2>/dev/null | grep -q .'
check "mpicc (Open MPI's compiler wrapper, which the mpi crate asks for flags) not on PATH" 'mpicc -showme:link'
check "pkg-config cannot find hdf5 (libhdf5-dev)" \
  'pkg-config --exists hdf5 || pkg-config --exists hdf5-serial || test -e /usr/include/hdf5/serial/hdf5.h'
check "h5dump (hdf5-tools) not on PATH" 'command -v h5dump'
check "mpirun (openmpi-bin) not on PATH" 'command -v mpirun'
check "cargo not found; install Rust from https://rustup.rs" 'command -v cargo'
[ $fail -eq 0 ] || exit 1
echo "setup-deps: ok (${packages[*]})"
