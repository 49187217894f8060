"""The demo's attribution step: generate with the base and the tuned model, attribute the tuned answers.

One model load serves everything: the tuned model (LoRA attached) completes each prompt greedily, the same
model with its adapter switched off gives the base model's answer for comparison, and the generated tokens
are attributed by several (method, measurement) rankings in one pass over the store. The first ranking is
the report's (with each token's share of each listed score); every ranking, and one by seeded random
scores, is checked against the play the prompt names (engine.demo_assets.own_play).

Scoring runs in this process: the store of 64 rows is read in milliseconds, so the Ray workers that built
it are not needed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import GenerationSettings, JobConfig, QueryOptions
from engine.demo_assets.own_play import TOP, chance, own_play, random_ranking
from engine.demo_assets.shakespeare import END_OF_TURN
from engine.errors import TributaryError

RANKINGS = (("if", "logprob_sum"), ("if", "logprob_mean"), ("grad_dot", "logprob_sum"), ("grad_cos", "logprob_sum"))
LABELS = {"if": "IF", "grad_dot": "Grad-Dot", "grad_cos": "Grad-Cos", "random": "random"}
MEASUREMENTS = {"logprob_sum": "sum", "logprob_mean": "mean"}


@dataclass
class Outcome:
    records: list[dict]  # the report's ranking, per prompt, with baseline, sources and own-play figures
    own_play: dict  # per prompt and ranking: top-1 from the prompt's play, its share of the top 10
    settings: dict

    def write_report(self, path: Path) -> Path:
        from engine.report.html import write_html_report

        return write_html_report(
            self.records,
            self.settings,
            path,
            title="Tributary demo: which Shakespeare speeches taught SmolLM2 that?",
            summary=_summary_table(self.own_play),
        )


def _label(method: str, measurement: str) -> str:
    return f"{LABELS[method]} {MEASUREMENTS[measurement]}"


def _source(row: dict) -> str:
    return f"{row['play']} · {row['speaker']} {row['act']}.{row['scene']}"


def attribute_demo(
    config: JobConfig, rows: list[dict], queries: list[dict], max_new_tokens: int, k: int = TOP
) -> Outcome:
    from peft import PeftModel

    from engine.query.attributor import Attributor, QueryGroup
    from engine.query.generate import PromptRow, generate
    from engine.query.plan_and_score import run_settings

    local = config.derive(cluster=None)
    attributor = Attributor.load(local)
    if attributor.ids != [row["id"] for row in rows]:
        raise TributaryError(
            f"the store {local.store.path} does not hold the adapter's training rows; delete it and run the demo again"
        )
    model = attributor.context.model
    if not isinstance(model, PeftModel):
        raise TributaryError(
            f"the demo's model {local.model.path} has no LoRA adapter attached ({local.model.adapter})"
        )
    settings = GenerationSettings(max_new_tokens=max_new_tokens, chat=True)
    prompts = [PromptRow(i, query["id"], i + 1, query["prompt"]) for i, query in enumerate(queries)]
    tuned = attributor.generated_queries(prompts, settings, "the demo's prompts")
    with model.disable_adapter():
        base = generate(
            model,
            attributor.context.tokenizer,
            prompts,
            settings,
            local.data.max_length,
            "the demo's prompts",
        )
    options = [
        QueryOptions(k=k, measurement=measurement, per_token=index == 0, generation=settings)
        for index, (_, measurement) in enumerate(RANKINGS)
    ]
    groups = [QueryGroup(tuned, option, attributor.method(method)) for (method, _), option in zip(RANKINGS, options)]
    results = attributor.attribute(groups, need_full=False)
    by_id = {row["id"]: row for row in rows}
    play_of = {row["id"]: row["play"] for row in rows}
    ids = list(attributor.ids)
    rankings = {  # label -> per prompt, (the top-k ids most supporting first, the bottom-k most opposing first)
        _label(method, measurement): [
            ([entry["id"] for entry in record["top_k"]], [entry["id"] for entry in record["bottom_k"]])
            for record in result.written_records()
        ]
        for (method, measurement), result in zip(RANKINGS, results)
    }
    shuffled = [random_ranking(ids, seed=q) for q in range(len(queries))]
    rankings[LABELS["random"]] = [(ranking[:k], ranking[::-1][:k]) for ranking in shuffled]
    summary = _own_play_summary(queries, rankings, play_of)
    summary["mean_ranks_as_sum"] = rankings[_label("if", "logprob_mean")] == rankings[_label("if", "logprob_sum")]
    for prompt, query, (supporting, opposing) in zip(summary["prompts"], queries, rankings[_label(*RANKINGS[0])]):
        prompt["same_prompt"] = same_prompt(query["prompt"], rows, supporting, opposing)
    records = results[0].written_records()
    for q, (record, query, baseline) in enumerate(zip(records, queries, base)):
        record["instruction"] = query["prompt"]
        record["play"] = query["play"]
        record["baseline"] = {"label": "base model (adapter off)", "text": baseline.completion}
        for entry in record["top_k"] + record["bottom_k"]:
            entry["source"] = _source(by_id[entry["id"]])
            entry["play"] = by_id[entry["id"]]["play"]
            entry["snippet"] = entry.get("snippet", "").replace(END_OF_TURN, "")
        record["own_play"] = summary["prompts"][q]
        figures = record["own_play"]["figures"][0]
        taught = record["own_play"]["same_prompt"]
        top = record["top_k"][0]
        record["own_play"]["first_token_share"] = round(top["per_token"][0] / top["score"], 3)
        record["note"] = (
            f"{figures['ranking']}: the top supporter is {'' if figures['top1'] else 'not '}from {query['play']}; "
            f"{figures[f'top{TOP}']:.0%} of the top {TOP} are, and {figures[f'bottom{TOP}']:.0%} of the top {TOP} "
            f"opposers (chance {record['own_play']['chance']:.0%}). Of the {taught['rows']} rows taught this very "
            f"prompt, {taught[f'top{TOP}']} are among the top {TOP} supporters and {taught[f'bottom{TOP}']} among "
            "the opposers: they teach another answer to it."
        )
    return Outcome(records, summary, run_settings(local, len(ids), options[0]))


def same_prompt(instruction: str, rows: list[dict], supporting: list[str], opposing: list[str]) -> dict:
    """How many training rows were taught this very instruction, and how many of them are among the top TOP
    supporters and the top TOP opposers."""
    taught = {row["id"] for row in rows if instruction in row["prompt"]}
    return {
        "rows": len(taught),
        f"top{TOP}": len(taught.intersection(supporting[:TOP])),
        f"bottom{TOP}": len(taught.intersection(opposing[:TOP])),
    }


def _own_play_summary(
    queries: list[dict], rankings: dict[str, list[tuple[list[str], list[str]]]], play_of: dict[str, str]
) -> dict:
    prompts = []
    for q, query in enumerate(queries):
        figures = [
            {"ranking": label, **own_play(*ranked[q], play_of, query["play"]).describe()}
            for label, ranked in rankings.items()
        ]
        prompts.append(
            {
                "id": query["id"],
                "instruction": query["prompt"],
                "play": query["play"],
                "chance": round(chance(play_of, query["play"]), 3),
                "figures": figures,
            }
        )
    columns = [
        {
            "label": label,
            "top1_count": sum(prompt["figures"][c]["top1"] for prompt in prompts),
            "top10_mean": round(sum(prompt["figures"][c][f"top{TOP}"] for prompt in prompts) / len(prompts), 3),
            "bottom10_mean": round(sum(prompt["figures"][c][f"bottom{TOP}"] for prompt in prompts) / len(prompts), 3),
        }
        for c, label in enumerate(rankings)
    ]
    return {
        "rows": len(play_of),
        "top": TOP,
        "chance": round(sum(prompt["chance"] for prompt in prompts) / len(prompts), 3),
        "columns": columns,
        "prompts": prompts,
    }


CAPTION = (
    "Does the attribution follow the play the prompt names? Each cell: is the top-1 supporter from that play "
    "(yes/no) · the play's share of the top {top} supporters · its share of the top {top} opposers. Chance is the "
    "play's share of the {rows} training speeches."
)


def cells(prompt: dict, separator: str = " · ") -> list[str]:
    """One prompt's figures per ranking, as 'yes · 10% · 40%'."""
    return [
        separator.join(("yes" if f["top1"] else "no", f"{f[f'top{TOP}']:.0%}", f"{f[f'bottom{TOP}']:.0%}"))
        for f in prompt["figures"]
    ]


def overall(summary: dict, separator: str = " · ") -> list[str]:
    """The figures over all prompts per ranking, as '4/4 · 12% · 45%'."""
    count = len(summary["prompts"])
    return [
        separator.join((f"{c['top1_count']}/{count}", f"{c['top10_mean']:.0%}", f"{c['bottom10_mean']:.0%}"))
        for c in summary["columns"]
    ]


def _summary_table(summary: dict) -> dict:
    """The own-play figures as the report's summary table."""
    header = ["prompt", "chance"] + [column["label"] for column in summary["columns"]]
    rows = [[prompt["instruction"], f"{prompt['chance']:.0%}"] + cells(prompt) for prompt in summary["prompts"]]
    rows.append(["all prompts", f"{summary['chance']:.0%}"] + overall(summary))
    return {
        "caption": CAPTION.format(top=TOP, rows=summary["rows"]),
        "header": header,
        "rows": rows,
    }
