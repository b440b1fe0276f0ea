"""A judge model behind any OpenAI-compatible endpoint scores answers 0-1, Belle-eval style.

One rubric per Belle-eval category; the standard answer is left out of the prompt
for generation, brainstorming and rewrite (open-ended: many answers are right), as
the original did. Replies are cached on disk by the exact request, so a rerun never
pays twice; failed requests are retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import append_jsonl, read_done
from ..registry import build_registry

logger = logging.getLogger(__name__)

SCORE_INSTRUCTION = "满分为1分，最低分为0分。请先按照“得分: X”的形式给出分数，再用一两句话说明理由。"


@dataclass(frozen=True)
class Rubric:
    """How the judge scores one Belle-eval category."""

    name: str
    criteria: str
    uses_reference: bool = True


RUBRICS: dict[str, Rubric] = build_registry(
    "judge rubric",
    Rubric("translation", "你是一名语言学家。请参考标准答案评价模型的翻译：意思要与原文一致，译文越通顺分数越高。"),
    Rubric("rewrite", "你是一名语文老师。请评价模型的改写：是否满足题目的改写要求，并保持原意、语句通顺。", False),
    Rubric("classification", "你是一名严谨的评审。请参考标准答案判断模型的分类是否正确，类别一致得1分，否则得0分。"),
    Rubric("generation", "你是一名写作老师。请评价模型的回答是否满足题目的写作要求，越切题、越流畅分数越高。", False),
    Rubric("summarization", "你是一名编辑。请参考标准答案评价模型的摘要：是否涵盖要点、是否简洁准确。"),
    Rubric("extract", "你是一名严谨的评审。请参考标准答案判断模型抽取的信息是否完整准确。"),
    Rubric("open qa", "你是一名领域专家。请参考标准答案评价模型的回答是否正确、完整、有帮助。"),
    Rubric("brainstorming", "你是一名创意顾问。请评价模型的回答是否满足题目要求，想法越切题、越丰富分数越高。", False),
    Rubric("closed qa", "你是一名严谨的评审。请参考标准答案判断模型的回答是否正确，答案一致得1分，否则得0分。"),
    Rubric("math", "你是一名数学老师。请参考标准答案判断模型的最终结果是否正确，结果一致得1分，否则得0分。"),
    Rubric("code", "你是一名资深程序员。请参考标准答案评价模型给出的代码是否正确实现了题目要求。"),
    Rubric("others", "你是一名严谨的评审。请参考标准答案评价模型的回答是否正确、有帮助。"),
)


def rubric_for(category: str) -> Rubric:
    """The rubric of a category (Belle-eval names, any case; unknown ones use ``others``)."""
    key = category.strip().lower().replace("_", " ")
    return RUBRICS.get(key) or RUBRICS.get(key.replace(" ", "")) or RUBRICS["others"]


def build_judge_prompt(category: str, question: str, reference: str, answer: str) -> str:
    """The judge's prompt for one answer: rubric, score format, question, [standard answer,] model answer."""
    rubric = rubric_for(category)
    parts = [rubric.criteria + SCORE_INSTRUCTION, f"问题: {question}"]
    if rubric.uses_reference and reference:
        parts.append(f"标准答案: {reference}")
    parts.append(f"模型回答: {answer}")
    return "\n".join(parts)


_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = rf"\s*(?:/|out of|满分)\s*{_NUMBER}"
_SCORE_PATTERNS = [
    re.compile(rf"(?:得分|分数|评分|打分|score|rating|grade)\**\s*(?:is|为|是|of)?\s*[:：=]?\s*\**\s*{_NUMBER}(?:{_OUT_OF})?",
               re.IGNORECASE),
    re.compile(rf"{_NUMBER}{_OUT_OF}", re.IGNORECASE),
    re.compile(rf"{_NUMBER}\s*分"),
]


def parse_score(reply: str) -> float | None:
    """The 0-1 score a judge's reply states, or ``None`` when it states none.

    "得分: 0.8", "Score: 1", "**Score**: 4/5", "I would give it 0.5 out of 1", "1分" all parse,
    however much text surrounds them; a bare number above 1 with no scale ("得分: 8") does not.
    """
    for pattern in _SCORE_PATTERNS:
        for match in pattern.finditer(reply):
            value = float(match.group(1))
            scale = float(match.group(2)) if match.lastindex and match.lastindex >= 2 and match.group(2) else 1.0
            if scale > 0 and 0 <= value <= scale:
                return round(value / scale, 4)
    return None


@dataclass
class Verdict:
    """A judge's reply and the score parsed from it (``None``: it stated none)."""

    reply: str
    score: float | None


class JudgeClient:
    """Chat completions from an OpenAI-compatible endpoint, with retries and an on-disk cache."""

    def __init__(self, url: str, model: str, cache_path: Path, api_key: str | None = None, max_tokens: int = 256,
                 retries: int = 5, timeout: float = 120.0, backoff: float = 1.0) -> None:
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key, self.max_tokens = model, api_key, max_tokens
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.cache_path = cache_path
        self.cache = self._read_cache(cache_path)
        self.requests = 0  # requests actually sent (cache misses)
        self.cache_hits = 0

    @staticmethod
    def _read_cache(path: Path) -> dict[str, str]:
        # A torn last line is cut off the file, so the next reply is not appended onto it; a line spoiled
        # by hand is skipped (flag None): that request is simply made again.
        return {entry["key"]: entry["reply"] for entry in read_done(path, None)}

    def _request_body(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens, "stream": False}

    def complete(self, prompt: str) -> str:
        """The judge's reply to ``prompt``: from the cache, or from the endpoint (then cached)."""
        body = self._request_body(prompt)
        # Keyed by the request alone (judge model, prompt, settings), not the URL: the same judge
        # moved to another host or port is not paid for again.
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in self.cache:
            self.cache_hits += 1
            return self.cache[key]
        reply = self._post_with_retries(body)
        self.requests += 1
        self.cache[key] = reply
        append_jsonl(self.cache_path, [{"key": key, "reply": reply}])  # synced: paid for, never lost to a crash
        return reply

    def _post_with_retries(self, body: dict[str, Any]) -> str:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 2)
                logger.info("judge: %s; retrying in %.1f s (%d of %d)", problem, delay, attempt, self.retries)
                time.sleep(delay)
            request = urllib.request.Request(self.endpoint, data, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                if error.code != 429 and error.code < 500:  # our request is wrong: retrying cannot help
                    raise UserError(f"--judge_url: {self.endpoint} answered HTTP {error.code}: {detail}") from error
                problem = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"{self.endpoint} unreachable ({getattr(error, 'reason', error)})"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as error:
                raise UserError(f"--judge_url: {self.endpoint} did not answer like an OpenAI chat completions "
                                f"endpoint ({error!r})") from error
        raise UserError(f"--judge_url: {problem} after {self.retries} retries; finished records are saved, "
                        "rerun the same command to continue")

    def score(self, category: str, question: str, reference: str, answer: str) -> Verdict:
        """Ask the judge about one answer and parse its score."""
        reply = self.complete(build_judge_prompt(category, question, reference, answer))
        return Verdict(reply, parse_score(reply))
