"""What `falcon-batch extract` must find, computed the slow, obvious way with HF transformers:
every candidate span of a document scored on its own. Shared by make_extract_reference.py
(the committed goldens) and bench_extract.py (the lm-eval-style peer).

The rules (README, "Extract"; issue 26):
- units of the source: `\\w+|[^\\w\\s]` with Unicode word characters (Python `re` on str);
- a candidate is source[start of unit i .. end of unit j], j - i < max_span_units, verbatim;
  the same text is one candidate, at its first occurrence (smallest start, then smallest end);
  offsets in code points, end exclusive;
- it joins the prompt as a choice does in `score` (lm_eval_split.lm_eval_pair: the prompt's
  trailing whitespace moves to it, the target delimiter goes in where neither side has
  whitespace, ids = encode(prompt + joint + text)[len(encode(prompt)):]);
- score = sum of log-probs of span ids ++ end ids, end = encode("\\n") alone without special
  tokens (or the EOS id); span_logprob = the span ids' part; tokens = len(span ids).
"""

import os
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
import lm_eval_split  # noqa: E402  (tests/fixtures: the split `score` is tested against)

UNIT = re.compile(r"\w+|[^\w\s]")
DEFAULT_TEMPLATE = "Document: {text}\nQuestion: {question}\nAnswer:"
TOP_K = 5
MAX_SPAN_UNITS = 16


def check_unit_chars(source, where):
    """Python's `\\w` (str.isalnum() or "_") and Rust regex's (Alphabetic, M, Nd, Pc,
    Join_Control) disagree on marks, connector punctuation other than "_", No numbers ("²",
    "½"), the joiners and the letter-like symbols that are Alphabetic but So ("Ⓐ"): a source
    holding one would split into different units, so it is refused (Nl, e.g. "Ⅻ", is a word
    character in both)."""
    for k, c in enumerate(source):
        cat = unicodedata.category(c)
        circled = "\u24b6" <= c <= "\u24e9" or "\U0001f130" <= c <= "\U0001f189"
        if c != "_" and (cat[0] == "M" or cat in ("Pc", "No") or c in "\u200c\u200d" or circled):
            raise ValueError(f"{where}: character {k} {c!r} ({cat}) is a word character in only one of Python re / Rust regex")


def candidates(source, max_span_units=MAX_SPAN_UNITS):
    """[(text, start, end)] in first-occurrence order, each text once."""
    units = [(m.start(), m.end()) for m in UNIT.finditer(source)]
    seen = {}
    for i in range(len(units)):
        for j in range(i, min(i + max_span_units, len(units))):
            s, e = units[i][0], units[j][1]
            seen.setdefault(source[s:e], (s, e))
    return [(t, s, e) for t, (s, e) in seen.items()], len(units)


def render(line, template=DEFAULT_TEMPLATE):
    """(prompt, source) of a corpus line: {"id","text","question"} through the template, or
    {"id","prompt","source"} as given."""
    if "prompt" in line:
        return line["prompt"], line["source"]
    return template.replace("{text}", line["text"]).replace("{question}", line["question"]), line["text"]


def split(encode, prompt, texts, delimiter=lm_eval_split.TARGET_DELIMITER):
    """(prompt ids, [span ids]) by `score`'s choice split."""
    prompt_ids, spans = None, []
    for t in texts:
        p, c, _ = lm_eval_split.lm_eval_pair(encode, prompt, t, delimiter)
        assert prompt_ids in (None, p), (prompt, t)
        prompt_ids = p
        spans.append(c)
    return prompt_ids, spans


def score_with_prompt_cache(torch, model, prompt_ids, conts, row_budget=512):
    """Per continuation, its per-token log-probs given the prompt, each continuation scored
    on its own: the prompt runs once, its keys and values are copied to every row of a batch,
    and the rows (right-padded, so a real token never sees a pad) continue from them. The
    log-softmax is taken in float64 over the model's logits (float64 too for a double model)."""
    from transformers import DynamicCache  # noqa: F401  (the cache type the model returns)
    import copy

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].double(), -1)
        past = out.past_key_values
        results = [None] * len(conts)
        order = sorted(range(len(conts)), key=lambda i: len(conts[i]))
        start = 0
        while start < len(order):
            width = len(conts[order[min(len(order) - 1, start)]])
            n = max(1, row_budget // max(1, width))
            idx = order[start:start + n]
            start += len(idx)
            width = max(len(conts[i]) for i in idx)
            rows = [conts[i] + [0] * (width - len(conts[i])) for i in idx]
            lp_first = [float(first[conts[i][0]]) for i in idx]
            if width == 1:
                for i, f in zip(idx, lp_first):
                    results[i] = [f]
                continue
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(idx))
            x = torch.tensor(rows)[:, :-1]
            logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
            lp = torch.log_softmax(logits.double(), -1)
            tgt = torch.tensor(rows)[:, 1:]
            got = lp.gather(2, tgt[:, :, None])[:, :, 0]
            for r, (i, f) in enumerate(zip(idx, lp_first)):
                results[i] = [f] + got[r, : len(conts[i]) - 1].tolist()
        return results


def pair_logprobs(torch, model, prompt_ids, cont):
    """The continuation's log-probs from one forward of prompt + continuation, no cache."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + cont]), use_cache=False).logits[0].double(), -1)
    return [float(lp[len(prompt_ids) + i - 1, t]) for i, t in enumerate(cont)]


def tol_plain(model, torch):
    """How far the cached, batched route may be from one plain forward: float64 models to
    1e-6 (measured 1.2e-7 on llama_gqa: HF keeps some rotary arithmetic in float32, where the
    two routes' shapes differ), float32 ones to float32 rounding over a batch."""
    return 1e-6 if next(model.parameters()).dtype == torch.float64 else 1e-3


def extract_document(torch, model, encode, line, end_ids, top=TOP_K + 5, template=DEFAULT_TEMPLATE,
                     delimiter=lm_eval_split.TARGET_DELIMITER, max_span_units=MAX_SPAN_UNITS, max_len=None):
    """Every candidate of a corpus line scored alone; the best `top` (ties to the earlier
    first occurrence) and the counts."""
    prompt, source = render(line, template)
    check_unit_chars(source, line["id"])
    cands, n_units = candidates(source, max_span_units)
    prompt_ids, spans = split(encode, prompt, [t for t, _, _ in cands], delimiter)
    if max_len is not None:
        longest = len(prompt_ids) + max(len(s) for s in spans) + len(end_ids)
        assert longest <= max_len, f"{line['id']}: {longest} tokens over the model's {max_len}"
    lps = score_with_prompt_cache(torch, model, prompt_ids, [s + end_ids for s in spans])
    scored = []
    for k, ((text, s, e), ids, lp) in enumerate(zip(cands, spans, lps)):
        scored.append(dict(text=text, start=s, end=e, score=sum(lp), span_logprob=sum(lp[: len(ids)]),
                           tokens=len(ids), ids=ids, order=k))
    scored.sort(key=lambda c: (-c["score"], c["order"]))
    for c in scored[:3]:  # the cached, batched route against one plain forward of the pair
        again = pair_logprobs(torch, model, prompt_ids, c["ids"] + end_ids)
        assert abs(sum(again) - c["score"]) < tol_plain(model, torch) * len(again), (line["id"], c["text"], sum(again), c["score"])
    for c in scored:
        del c["order"]
    return dict(prompt=prompt, prompt_ids=prompt_ids, n_units=n_units, n_candidates=len(cands),
                max_candidate_tokens=max(len(s) for s in spans), top=scored[:top])
