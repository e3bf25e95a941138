#!/bin/bash
# TCGA-BRCA's Cox C-index against the marginal workload's rounds, emulated (a central
# fit at the epsilon whose noise equals the federated sums'; reproducible noise, labelled,
# so configurations are paired seed for seed). Central epsilon 3 is the noise of 6 regions
# at epsilon 3 under masks with honest-sites = 6; 1.116 the same regions at H = 1.
#   bash benchmarks/marginal-datasets/eleventh-pass/rounds.sh
#   python benchmarks/marginal-datasets/eleventh-pass/table.py
set -euo pipefail
export OMP_NUM_THREADS=1
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
S=0,1,2,3,4,5,6,7,8,9,10,11
for P in '{}' '{"rounds": 4}' '{"rounds": 6}' '{"rounds": 8}' '{"max_way": 3}' '{"rounds": 4, "max_way": 3}'; do
  ../../.venv/bin/python emulate_sites.py tcga_brca 3 "$P" $S | grep '^{' >> "$HERE/rounds.jsonl"
done
for P in '{}' '{"rounds": 6}' '{"rounds": 8}'; do
  ../../.venv/bin/python emulate_sites.py tcga_brca 3 "$P" 12,13,14,15,16,17,18,19,20,21,22,23 | grep '^{' >> "$HERE/rounds.jsonl"
done
for E in 1.116 2.0; do for P in '{}' '{"rounds": 6}'; do
  ../../.venv/bin/python emulate_sites.py tcga_brca $E "$P" $S | grep '^{' >> "$HERE/rounds-eps.jsonl"
done; done
