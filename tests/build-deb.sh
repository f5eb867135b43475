#!/bin/sh
# Builds the Debian package amidala with cargo-deb (tests/install-deps.sh --deb installs the
# pinned cargo-deb and dpkg-dev if missing): the binaries and plugins, then the completions and
# manual pages the client generates, then `cargo deb`. Honours CARGO_TARGET_DIR; the package
# lands in its debian/ directory (default target/debian/), and its path is the last line printed.
#
#   tests/build-deb.sh                  release build, as for a builder host
#   tests/build-deb.sh --profile dev --no-build
#                                       package what `cargo build` already built (the tests)
#   tests/build-deb.sh -- --fast        arguments after -- go to cargo deb
set -eu
usage() {
    echo "usage: $0 [--profile PROFILE] [--no-build] [-- CARGO-DEB-ARGS...]" >&2
    exit 2
}
profile=release
build=yes
while [ $# -gt 0 ]; do
    case "$1" in
    --profile)
        [ $# -ge 2 ] || usage
        profile=$2
        shift 2
        ;;
    --no-build)
        build=no
        shift
        ;;
    --)
        shift
        break
        ;;
    *) usage ;;
    esac
done
cd "$(dirname "$0")/.."
tests/install-deps.sh --deb
. tests/find-cargo.sh

# cargo's directory of this profile: target/debug for dev, target/<profile> otherwise.
target_dir=$(cargo metadata --format-version 1 --no-deps --offline |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || {
    echo "$0: no target directory in cargo metadata" >&2
    exit 1
}
case "$profile" in
dev | debug) profile_dir=debug ;;
*) profile_dir=$profile ;;
esac
out=$target_dir/$profile_dir

if [ "$build" = yes ]; then
    cargo build --profile "$profile" -p amidala -p amidalad \
        -p amidala-shell -p amidala-chef -p amidala-ansible
fi
for file in amidala amidalad amidalad-exec libamidala_shell.so libamidala_chef.so libamidala_ansible.so; do
    [ -f "$out/$file" ] || {
        echo "$0: $out/$file is missing: build it first (cargo build --profile $profile --workspace)" >&2
        exit 1
    }
done

# The generated assets, where daemon/Cargo.toml's [package.metadata.deb] takes them
# (target/release/deb-assets is cargo-deb's name for $out/deb-assets).
assets=$out/deb-assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/man"
"$out/amidala" completions bash >"$assets/completions/amidala.bash"
"$out/amidala" completions zsh >"$assets/completions/_amidala"
"$out/amidala" completions fish >"$assets/completions/amidala.fish"
# `amidala man` prints amidala(1), then amidala-build(1) and the other commands' pages, one
# after the other; each starts with the same roff prelude, then its .TH line names it.
"$out/amidala" man | awk -v dir="$assets/man" '
    /^\.ie \\n\(\.g \.ds Aq/ { if (file != "") close(file); file = ""; held = $0 "\n"; next }
    file == "" && /^\.TH / { file = dir "/" $2 ".1"; printf "%s", held > file }
    file != "" { print > file; next }
    { held = held $0 "\n" }
'
[ -s "$assets/man/amidala.1" ] || {
    echo "$0: amidala man gave no amidala(1)" >&2
    exit 1
}
gzip -9n "$assets"/man/*.1

# --strip: the dev profile's binaries carry debug info cargo-deb would otherwise keep.
deb=$(cargo deb -p amidalad --no-build --profile "$profile" --strip "$@")
echo "$deb"
