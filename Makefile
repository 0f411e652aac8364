# Conveniences; the scripts are the reference (README names them).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

bench: setup
	.venv/bin/python -m bench.challenge_throughput
	.venv/bin/python -m bench.issuance
	.venv/bin/python -m bench.swap
	.venv/bin/python -m bench.scale
