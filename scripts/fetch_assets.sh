#!/usr/bin/env bash
# Fetch the site's JavaScript from the npm registry into _vendor/ (git-ignored), so the built book needs no
# CDN: MathJax 3 (math), RequireJS and @jupyter-widgets/html-manager (embedded ipywidgets).
# npm verifies each tarball against the registry's integrity hash. The folder is assembled under a temporary
# name and renamed at the end, so an interrupted fetch never leaves a half-filled _vendor/.
# Idempotent: does nothing when _vendor/VERSIONS matches the pinned versions below.
set -euo pipefail
MATHJAX=mathjax@3.2.2
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
REQUIREJS=requirejs@2.3.8
want="$MATHJAX $HTML_MANAGER $REQUIREJS"
dest=_vendor
if [ -f "$dest/VERSIONS" ] && [ "$(cat "$dest/VERSIONS")" = "$want" ]; then
  echo "assets: $dest/ is up to date ($want)"
  exit 0
fi
command -v npm >/dev/null || { echo "assets: npm not found: install Node.js and npm (e.g. apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d "${dest}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$MATHJAX" "$HTML_MANAGER" "$REQUIREJS" >/dev/null 2>npm.log) \
  || { cat "$tmp/npm.log" >&2; echo "assets: npm pack failed (is the npm registry reachable?)" >&2; exit 1; }
mkdir -p "$tmp/out" "$tmp/x1" "$tmp/x2" "$tmp/x3"
tar -xzf "$tmp"/mathjax-*.tgz -C "$tmp/x1"
tar -xzf "$tmp"/jupyter-widgets-html-manager-*.tgz -C "$tmp/x2"
tar -xzf "$tmp"/requirejs-*.tgz -C "$tmp/x3"
mv "$tmp/x1/package/es5" "$tmp/out/mathjax"
cp "$tmp/x2/package/dist/embed-amd.js" "$tmp/out/embed-amd.js"
cp "$tmp/x3/package/require.js" "$tmp/out/require.js"
for f in mathjax/tex-chtml.js embed-amd.js require.js; do
  [ -s "$tmp/out/$f" ] || { echo "assets: $f missing from the npm packages" >&2; exit 1; }
done
echo "$want" > "$tmp/out/VERSIONS"
rm -rf "$dest"
mv "$tmp/out" "$dest"
echo "assets: fetched $want into $dest/ ($(du -sh "$dest" | cut -f1))"
