# Sourced by the GPU scripts (repo root, $OUT set): build portmla._cuda with the CuTe headers,
# then a resource / SASS summary of the Hopper kernel. The machine has no network, so the
# headers come from the installed nvidia-cutlass package or from the wheel the caller carried
# in _wheels/ (pip download "nvidia-cutlass==4.2.0.0" --no-deps -d _wheels).
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
  whl=$(ls _wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[z.extract(n, 'build/cutlass') for n in z.namelist() if n.startswith('cutlass_library/source/include/')]" "$whl"
    export PORTMLA_CUTLASS_INCLUDE=$PWD/build/cutlass/cutlass_library/source/include
  fi
fi
echo "cutlass headers: ${PORTMLA_CUTLASS_INCLUDE:-installed nvidia-cutlass package}"
echo "== build"
PORTMLA_CUDA_ARCHS=${PORTMLA_CUDA_ARCHS:-90a} python csrc_cuda/build.py --verbose-ptxas \
  > "$OUT/ptxas.txt" 2>&1; echo "build exit $?"
grep -E "hopper kernel|FAILED|error|^built" "$OUT/ptxas.txt" | head -20
grep -A2 "Function properties for .*hopper" "$OUT/ptxas.txt" | grep -E "spill|Used"
cuobjdump -sass portmla/_cuda*.so > "$OUT/sass.txt" 2>&1
echo "HGMMA instructions in SASS: $(grep -c HGMMA "$OUT/sass.txt")"
grep -o "HGMMA[.A-Z0-9x]*" "$OUT/sass.txt" | sort | uniq -c
rm -f "$OUT/sass.txt"
