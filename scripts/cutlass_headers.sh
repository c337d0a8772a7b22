# Sourced by the GPU scripts: CuTe / CUTLASS headers for csrc_cuda/build.py on a machine
# without network. Uses the installed nvidia-cutlass package if there is one, else unpacks the
# wheel the caller carried in _wheels/ (pip download nvidia-cutlass==4.2.0.0 --no-deps -d _wheels).
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
  whl=$(ls _wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[z.extract(n, 'build/cutlass') for n in z.namelist() if n.startswith('cutlass_library/source/include/')]" "$whl"
    export PORTMLA_CUTLASS_INCLUDE=$PWD/build/cutlass/cutlass_library/source/include
  fi
fi
echo "cutlass headers: ${PORTMLA_CUTLASS_INCLUDE:-installed nvidia-cutlass package}"
