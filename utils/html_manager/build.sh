#!/usr/bin/env bash
# Bundle the browser code the built book serves itself, so that every page
# works offline and none loads from a CDN:
#   widgets/  the ipywidgets HTML manager (embed-amd.js, which renders the widget
#             state saved in each executed chapter) and RequireJS, which
#             embed-amd.js needs;
#   mathjax/  MathJax 3, which Sphinx would otherwise load from a CDN.
# Run by `make widgets-js` (so by `make book`) before `jupyter-book build`.
#
# Installs the exact versions in package-lock.json from the npm registry into
# _build/widgets-js/ (never committed), copies the files a browser needs into
# _build/widgets-js/site/_static/_vendor/, and writes _build/widgets-js/STAMP,
# the Makefile's target. _config.yml lists _build/widgets-js/site in
# html_extra_path: Sphinx copies its contents to the root of _build/html, so the
# files land in _build/html/_static/_vendor/, where script paths in _config.yml
# (relative to _static, as Sphinx wants) find them. They are not in a source
# _static/ folder, whose every .js and .css Jupyter Book adds to every page.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$root/_build/widgets-js"
vendor="$work/site/_static/_vendor"

command -v npm >/dev/null || {
    echo "build.sh: npm not found; install Node.js (>= 18) with npm" >&2
    exit 1
}

mkdir -p "$work"
rm -f "$work/STAMP"
cp "$here/package.json" "$here/package-lock.json" "$work/"
# npm ci installs exactly the lockfile or fails. --ignore-scripts: we only copy
# files; no package needs to run anything (Font Awesome's only prints a banner).
(cd "$work" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
modules="$work/node_modules"

rm -rf "$work/site"
mkdir -p "$vendor/widgets" "$vendor/mathjax" "$vendor/licenses"

# The HTML manager: embed-amd.js defines the base, controls, output and
# html-manager AMD modules and, on page load, renders every widget view whose
# state the page embeds. It loads its Font Awesome fonts (button icons) from its
# own folder, so they go beside it.
manager="$modules/@jupyter-widgets/html-manager/dist"
cp "$modules/requirejs/require.js" "$vendor/widgets/"
cp "$here/setup.js" "$vendor/widgets/"  # ours: font path, MathJax 3 bridge
cp "$manager/embed-amd.js" "$vendor/widgets/"
for ext in woff2 woff; do  # every browser since 2014 takes one of these
    cp "$manager"/*."$ext" "$vendor/widgets/"
done

# MathJax: the combined TeX/MathML input + CommonHTML output file, plus the
# folders it loads on demand (fonts, TeX extensions, menu, accessibility).
mathjax="$modules/mathjax/es5"
cp "$mathjax/tex-mml-chtml.js" "$vendor/mathjax/"
cp -r "$mathjax/input" "$mathjax/output" "$mathjax/ui" "$mathjax/a11y" \
    "$mathjax/sre" "$mathjax/adaptors" "$vendor/mathjax/"

# Licences: the bundle's own notice file, Font Awesome's and MathJax's. RequireJS
# (MIT) carries its licence in the header of require.js.
cp "$manager/embed.js.LICENSE.txt" "$vendor/licenses/html-manager-bundled.txt"
cp "$modules/@fortawesome/fontawesome-free/LICENSE.txt" "$vendor/licenses/fontawesome-free.txt"
cp "$modules/mathjax/LICENSE" "$vendor/licenses/mathjax.txt"
{
    echo "Installed from the npm registry when the book was built (utils/html_manager):"
    for pkg in @jupyter-widgets/html-manager requirejs @fortawesome/fontawesome-free mathjax; do
        node -e 'const p = require(process.argv[1]); console.log(`${p.name} ${p.version} (${p.license})`)' \
            "$modules/$pkg/package.json"
    done
} >"$vendor/licenses/README.txt"

touch "$work/STAMP"
echo "build.sh: browser code ready in ${vendor#"$root"/}"
