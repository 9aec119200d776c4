# bise: common tasks. `make quickstart` and `make test` are the two set-up commands of the README; each creates
# .venv and installs the project when needed (torch 2.14.1 / torchvision 0.29.1 pinned in pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MNIST  ?= ../shared/data/mnist

.PHONY: help install quickstart example-own-model test lint bench table-multicolor-mnist table-cifar10c table-celeba table-biased-mnist table-ablation table-efficiency table-label-noise table-civilcomments clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[text,launchers,export,timm,tracking,parquet,dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install bise with all extras

quickstart: $(STAMP)  ## reduced Multi-Color MNIST protocol: vanilla -> BISE -> prune -> baselines, ~3 min on CPU
	$(BIN)/bise run experiment=quickstart

example-own-model: $(STAMP)  ## your model + your data: PNG manifest, a user-trained torchvision ResNet-18 -> BISE -> card -> ONNX
	$(BIN)/python -m bise_cli.examples.own_model
	$(BIN)/bise run experiment=example/own_model
	$(BIN)/bise export outputs/runs/experiment=example_own_model --format onnx

test: $(STAMP)  ## the test suite (CPU, no network, no ../shared), one worker per core
	$(BIN)/python -m pytest -n auto --dist loadfile tests

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check bise_cli tests benchmarks

bench: $(STAMP)  ## benchmarks (minutes; some need the full MNIST in $(MNIST))
	$(BIN)/python benchmarks/run_all.py --mnist $(MNIST)

table-multicolor-mnist: $(STAMP)  ## paper Table: Multi-Color MNIST, full protocol, 3 seeds (~30 min on 2 CPU cores)
	$(BIN)/bise run -m experiment=paper/multicolor_mnist
	$(BIN)/bise table outputs/sweeps/paper_multicolor_mnist --reference

table-cifar10c: $(STAMP)  ## paper Table: Corrupted CIFAR-10 with ResNet18 (release files in datasets/cifar10c; GPU hours)
	$(BIN)/bise run -m experiment=paper/cifar10c dataset.root=datasets/cifar10c
	$(BIN)/bise table outputs/sweeps/paper_cifar10c --reference

table-celeba: $(STAMP)  ## paper Table: CelebA Blond_Hair x Male with ResNet18 (files in datasets/celeba; GPU hours)
	$(BIN)/bise run -m experiment=paper/celeba dataset.root=datasets/celeba
	$(BIN)/bise table outputs/sweeps/paper_celeba --reference

table-biased-mnist: $(STAMP)  ## paper Table: BiasedMNIST rho x seeds x {vanilla, BISE, BISE+FT} (GPU hours)
	$(BIN)/bise run -m experiment=paper/biased_mnist dataset.root=$(MNIST)
	$(BIN)/bise table outputs/sweeps/paper_biased_mnist --reference

table-ablation: $(STAMP)  ## paper ablation: reweighting x MI at rho 0.99 (GPU hours)
	$(BIN)/bise run -m experiment=paper/ablation dataset.root=$(MNIST)
	$(BIN)/bise table outputs/sweeps/paper_ablation --reference

table-efficiency: $(STAMP)  ## paper efficiency: sparsity, MACs, latency (GPU hours)
	$(BIN)/bise run -m experiment=paper/efficiency dataset.root=$(MNIST)
	$(BIN)/bise table outputs/sweeps/paper_efficiency --metrics sparsity_units sparsity_weights macs latency_ms_b1

table-label-noise: $(STAMP)  ## paper: BiasedMNIST rho 0.99 with 0/10/20 % flipped labels (GPU hours)
	$(BIN)/bise run -m experiment=paper/label_noise dataset.root=$(MNIST)
	$(BIN)/bise table outputs/sweeps/paper_label_noise --reference

table-civilcomments: $(STAMP)  ## CivilComments with BERT (needs the WILDS CSV in datasets/civilcomments; GPU days)
	$(BIN)/bise run -m experiment=paper/civilcomments
	$(BIN)/bise table outputs/sweeps/paper_civilcomments --metrics acc acc_avg_group acc_worst_group dp_diff eo_diff

clean:  ## remove runs, sweeps and caches (keeps datasets/)
	rm -rf outputs/runs outputs/sweeps outputs/cache outputs/data
