#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent: a second run with unchanged
# requirements does nothing.
#   bash scripts/setup.sh                              # the project (what the README's commands need)
#   bash scripts/setup.sh --hpacellseg --detectron2    # plus the optional upstream packages
#   bash scripts/setup.sh --system --hpacellseg        # into $PYTHON itself, no .venv (containers)
# The optional packages are not on PyPI. They come from a folder of wheels when there is one
# (HPA_SCC_WHEELS, default ../shared/wheels beside the checkout: what CI uses), else they are
# built from GitHub at the commits pinned in scripts/setup.sh (HPA_SCC_WHEELS=github forces that;
# HPA_SCC_GITHUB=URL reads GitHub's archive URLs from a mirror or a file:// copy instead).
# Each is installed with --no-deps, its PyPI dependencies from requirements-<name>.txt.
set -euo pipefail
# A relative HPA_SCC_WHEELS means the folder where the command was run, not the checkout.
case ${HPA_SCC_WHEELS:-} in ""|github|/*) ;; *) HPA_SCC_WHEELS=$PWD/$HPA_SCC_WHEELS ;; esac
cd "$(dirname "$0")/.."

HPACELLSEG_COMMIT=7b6dbc635253f08d392c96269e03149e2fb785c2   # CellProfiling/HPA-Cell-Segmentation
PYTORCH_ZOO_COMMIT=e7f30cd9d2e900439f98d250ac309caf03a166b4  # haoxusci/pytorch_zoo
DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833   # facebookresearch/detectron2
GITHUB=${HPA_SCC_GITHUB:-https://github.com}

extras=()
system=
for arg in "$@"; do
    case $arg in
        --hpacellseg|--detectron2) extras+=("${arg#--}") ;;
        --system) system=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $arg (use --hpacellseg, --detectron2, --system or none)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $PYTHON is not Python 3.11+; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ -n "$system" ]; then
    PY=$PYTHON
    stamps=$(mktemp -d)  # a container build installs once: nothing to remember
else
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    PY=.venv/bin/python
    stamps=.venv
fi
PIP=("$PY" -m pip install --quiet)

stamp=$stamps/.hpa_scc-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing the project into $([ -n "$system" ] && echo "$PY" || echo .venv) (first time: a few minutes, torch is large)"
    "${PIP[@]}" -r requirements.txt
    # editable, so the package finds configs/ beside it, as in a checkout
    "${PIP[@]}" --no-deps -e .
    echo "$want" > "$stamp"
fi
[ ${#extras[@]} -eq 0 ] && exit 0

WHEELS=${HPA_SCC_WHEELS:-}
if [ -z "$WHEELS" ] && [ -d ../shared/wheels ]; then WHEELS=$(cd ../shared/wheels && pwd); fi
[ -n "$WHEELS" ] || WHEELS=github

wheel() {  # the one wheel of package $1 in $WHEELS (checked by need_wheels first)
    local found=("$WHEELS"/"$1"-*.whl)
    echo "${found[0]}"
}

need_wheels() {  # in this shell, so that the error ends the script
    local name found
    if [ ! -d "$WHEELS" ]; then
        echo "error: HPA_SCC_WHEELS=$WHEELS: no such folder; give the folder that holds the wheels, or github" >&2
        exit 1
    fi
    for name in "$@"; do
        found=("$WHEELS"/"$name"-*.whl)
        if [ ! -f "${found[0]}" ]; then
            echo "error: no $name wheel in $WHEELS; put one there, or set HPA_SCC_WHEELS=github to build from GitHub" >&2
            exit 1
        fi
    done
}

github_pytorch_zoo() {
    # Upstream's setup.py calls setuptools.setup without importing setuptools, which fails in
    # any PEP 517 build; the package itself is fine, so add the import and build the copy.
    local tmp; tmp=$(mktemp -d)
    "$PY" - "$tmp" "$GITHUB/haoxusci/pytorch_zoo/archive/$PYTORCH_ZOO_COMMIT.zip" <<'PY'
import io, sys, urllib.request, zipfile
from pathlib import Path
tmp, url = Path(sys.argv[1]), sys.argv[2]
zipfile.ZipFile(io.BytesIO(urllib.request.urlopen(url, timeout=120).read())).extractall(tmp)
setup = next(tmp.glob("*/setup.py"))
text = setup.read_text()
if "import setuptools" not in text:
    setup.write_text("import setuptools\n" + text)
print(setup.parent)
PY
    "${PIP[@]}" --no-deps "$(ls -d "$tmp"/*/)"
    rm -rf "$tmp"
}

for extra in "${extras[@]}"; do
    stamp=$stamps/.hpa_scc-$extra
    source_id="github $GITHUB"
    if [ "$WHEELS" != github ]; then
        case $extra in
            hpacellseg) need_wheels hpacellseg pytorch_zoo; source_id=$(sha256sum "$(wheel hpacellseg)" "$(wheel pytorch_zoo)") ;;
            detectron2) need_wheels detectron2; source_id=$(sha256sum "$(wheel detectron2)") ;;
        esac
    fi
    want=$(printf '%s\n%s\n' "$(cat "requirements-$extra.txt")" "$source_id" | sha256sum | cut -d' ' -f1)
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && continue
    echo "installing $extra (from ${WHEELS})"
    "${PIP[@]}" -r "requirements-$extra.txt"
    case $extra:$WHEELS in
        hpacellseg:github)
            "${PIP[@]}" --no-deps "$GITHUB/CellProfiling/HPA-Cell-Segmentation/archive/$HPACELLSEG_COMMIT.zip"
            github_pytorch_zoo ;;
        hpacellseg:*) "${PIP[@]}" --no-deps "$(wheel hpacellseg)" "$(wheel pytorch_zoo)" ;;
        # Compiles detectron2's C++/CUDA operators against the installed torch (minutes).
        detectron2:github)
            "${PIP[@]}" --no-deps --no-build-isolation "$GITHUB/facebookresearch/detectron2/archive/$DETECTRON2_COMMIT.zip" ;;
        detectron2:*) "${PIP[@]}" --no-deps "$(wheel detectron2)" ;;
    esac
    module=$([ "$extra" = hpacellseg ] && echo "hpacellseg.cellsegmentator, pytorch_zoo.unet" || echo "detectron2.model_zoo, detectron2.engine")
    "$PY" -c "import $module" 2>/dev/null || { echo "error: $extra installed but 'import $module' fails" >&2; exit 1; }
    echo "$want" > "$stamp"
done
