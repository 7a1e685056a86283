# Paper tables from run records (buzz/tables.py; one definition per table in experiments/<name>.yaml).
#
#   make tables                      # run every table's jobs (finished ones are skipped), then render
#   make table-summarization         # CNN/DM + XSUM ROUGE per policy x budget, plus full
#   make table-qa                    # 10-document QA accuracy, gold at 0, 4, 9
#   make table-ppl                   # Wikitext perplexity through the cache
#   make table-memory                # stored KV tokens/bytes and latency of the summarization runs
#   make table-streaming             # perplexity per 4k position bucket of one 32k-token Wikitext stream, int budget
#   make table-passkey               # passkey accuracy by context length x depth (SYNTHETIC prompts), int budget
#   make tables-render               # rebuild every table and plot from stored records only (runs nothing)
#
# Knobs: MODEL=<configs/model name> (default: the profile's, smollm2-135m), PROFILE=default|paper (paper:
# llama2-7b-chat and the paper's sample counts), LIMIT=<samples per job, or null for all>, DEVICE=auto|cpu|cuda,
# POLICIES=window,h2o,... BUDGETS=0.2,0.5 (default: the table's; render shows every policy/budget found unless
# given; 'streaming_llm[positions=in_cache]' is a policy with cache overrides), OUTPUT=<root> (runs in
# $(OUTPUT)/runs, tables in $(OUTPUT)/; default results), RUNS=<records root to use instead of $(OUTPUT)/runs>,
# LOGGER=none|wandb, RUN_ARGS='<more run.py overrides>'.
# Example: make table-summarization MODEL=tiny-llama LIMIT=2 POLICIES=window,h2o BUDGETS=0.5 OUTPUT=/tmp/tables

MODEL ?=
PROFILE ?= default
LIMIT ?=
DEVICE ?=
POLICIES ?=
BUDGETS ?=
OUTPUT ?= results
RUNS ?=
LOGGER ?= none
RUN_ARGS ?=

TABLES_PY = $(PY) -m buzz.tables
_TABLE_SEL = --output $(OUTPUT) $(if $(RUNS),--runs-dir $(RUNS)) --profile $(PROFILE) $(if $(MODEL),--model $(MODEL)) \
	$(if $(POLICIES),--policies '$(POLICIES)') $(if $(BUDGETS),--budgets $(BUDGETS))
_RENDER_SEL = --output $(OUTPUT) --profile $(PROFILE) $(if $(MODEL),--model $(MODEL)) \
	$(if $(POLICIES),--policies '$(POLICIES)') $(if $(BUDGETS),--budgets $(BUDGETS))
_TABLE_RUN = $(_TABLE_SEL) $(if $(LIMIT),--limit $(LIMIT)) $(if $(DEVICE),--device $(DEVICE)) --logger $(LOGGER) \
	$(if $(RUN_ARGS),--extra '$(RUN_ARGS)')

.PHONY: tables tables-export tables-render table-summarization table-qa table-ppl table-memory table-streaming \
	table-passkey tables-dry-run

table-summarization: $(STAMP)
	$(TABLES_PY) run summarization $(_TABLE_RUN)

table-qa: $(STAMP)
	$(TABLES_PY) run qa $(_TABLE_RUN)

table-ppl: $(STAMP)
	$(TABLES_PY) run ppl $(_TABLE_RUN)

table-memory: $(STAMP)
	$(TABLES_PY) run memory $(_TABLE_RUN)

table-streaming: $(STAMP)
	$(TABLES_PY) run streaming $(_TABLE_RUN)

table-passkey: $(STAMP)
	$(TABLES_PY) run passkey $(_TABLE_RUN)

tables: $(STAMP)
	$(TABLES_PY) run all $(_TABLE_RUN)
	$(TABLES_PY) export --runs-dir $(OUTPUT)/runs --to $(OUTPUT)/records
	$(TABLES_PY) render all $(_RENDER_SEL) --runs-dir $(OUTPUT)/records

## Copy the records (without the datasets' reference texts) into $(OUTPUT)/records, which is committed.
tables-export: $(STAMP)
	$(TABLES_PY) export --runs-dir $(or $(RUNS),$(OUTPUT)/runs) --to $(OUTPUT)/records

## Every table, plot and results/README.md from the committed records ($(OUTPUT)/records, or RUNS=); no model runs.
tables-render:
	$(TABLES_PY) render all $(_RENDER_SEL) --runs-dir $(or $(RUNS),$(OUTPUT)/records)

## The run.py commands `make tables` would run, without running them.
tables-dry-run:
	$(TABLES_PY) run all $(_TABLE_RUN) --dry-run
