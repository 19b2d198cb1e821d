# Sourced by the GPU scripts: packages carried as wheels in .whl/ and Fashion-MNIST in .data/ for
# machines without network; results go to $OUT.
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .data/fashion-mnist ] && export DEPLOYCRAFT_DATA="$PWD/.data"
