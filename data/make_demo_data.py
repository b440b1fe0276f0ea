"""Generate the demo data: chain-of-thought arithmetic word problems in English and Chinese.

    python data/make_demo_data.py            # writes data/demo/demo_train.json and demo_heldout.json

Deterministic (fixed seed): the same files come out on every machine. Each record
is in the unified format (instruction, input, output); the output reasons step by
step and ends with "The answer is N." / "答案是N。", which the held-out metric reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

EN_NAMES = ["Tom", "Anna", "Li Lei", "Maria", "Sam", "Priya", "Omar", "Emma", "Ken", "Lucy"]
ZH_NAMES = ["小明", "小红", "李雷", "韩梅梅", "王芳", "张伟", "小刚", "丽丽", "阿强", "小美"]
EN_ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "stamps", "cards"]
ZH_ITEMS = [("个", "苹果"), ("本", "书"), ("支", "铅笔"), ("张", "贴纸"), ("颗", "弹珠"),
            ("块", "饼干"), ("枚", "邮票"), ("张", "卡片")]

Problem = tuple[str, str]  # (question, chain-of-thought answer)


def _buy_give(rng: random.Random, zh: bool) -> Problem:
    a, b = rng.randint(10, 60), rng.randint(5, 40)
    c = rng.randint(2, a + b - 1)
    s, r = a + b, a + b - c
    if zh:
        name, (unit, item) = rng.choice(ZH_NAMES), rng.choice(ZH_ITEMS)
        q = f"{name}有{a}{unit}{item}，又买了{b}{unit}，然后送给朋友{c}{unit}。{name}现在有多少{unit}{item}？"
        cot = f"第一步：买了之后有{a} + {b} = {s}{unit}。\n第二步：送出之后剩下{s} - {c} = {r}{unit}。\n答案是{r}。"
    else:
        name, item = rng.choice(EN_NAMES), rng.choice(EN_ITEMS)
        q = (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. "
             f"How many {item} does {name} have now?")
        cot = (f"Step 1: after buying, {name} has {a} + {b} = {s} {item}.\n"
               f"Step 2: after giving some away, {name} has {s} - {c} = {r} {item}.\nThe answer is {r}.")
    return q, cot


def _boxes(rng: random.Random, zh: bool) -> Problem:
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 20)
    s, r = a * b, a * b + c
    if zh:
        unit, item = rng.choice(ZH_ITEMS)
        q = f"每个盒子装{a}{unit}{item}，一共有{b}个盒子，另外还有{c}{unit}散装的。一共有多少{unit}{item}？"
        cot = f"第一步：盒子里共有{a} × {b} = {s}{unit}。\n第二步：加上散装的，共有{s} + {c} = {r}{unit}。\n答案是{r}。"
    else:
        item = rng.choice(EN_ITEMS)
        q = (f"Each box holds {a} {item}. There are {b} boxes and {c} loose {item}. "
             f"How many {item} are there in total?")
        cot = (f"Step 1: the boxes hold {a} × {b} = {s} {item}.\n"
               f"Step 2: adding the loose ones gives {s} + {c} = {r} {item}.\nThe answer is {r}.")
    return q, cot


def _share(rng: random.Random, zh: bool) -> Problem:
    b, k = rng.randint(2, 9), rng.randint(2, 12)
    extra = rng.randint(1, 15)
    a = b * k
    total = a + extra
    if zh:
        name, (unit, item) = rng.choice(ZH_NAMES), rng.choice(ZH_ITEMS)
        q = f"{name}有{total}{unit}{item}，自己留下{extra}{unit}，其余的平均分给{b}个朋友。每个朋友分到多少{unit}？"
        cot = (f"第一步：要分的有{total} - {extra} = {a}{unit}。\n"
               f"第二步：每个朋友分到{a} ÷ {b} = {k}{unit}。\n答案是{k}。")
    else:
        name, item = rng.choice(EN_NAMES), rng.choice(EN_ITEMS)
        q = (f"{name} has {total} {item}, keeps {extra} and shares the rest equally among {b} friends. "
             f"How many {item} does each friend get?")
        cot = (f"Step 1: {name} shares {total} - {extra} = {a} {item}.\n"
               f"Step 2: each friend gets {a} ÷ {b} = {k} {item}.\nThe answer is {k}.")
    return q, cot


def _shop(rng: random.Random, zh: bool) -> Problem:
    a = rng.randint(30, 99)
    b = rng.randint(5, a // 2)
    c = rng.randint(1, a - b - 1)
    s, r = a - b, a - b - c
    if zh:
        unit, item = rng.choice(ZH_ITEMS)
        q = f"商店有{a}{unit}{item}，上午卖出{b}{unit}，下午又卖出{c}{unit}。还剩多少{unit}？"
        cot = (f"第一步：上午卖完后剩下{a} - {b} = {s}{unit}。\n"
               f"第二步：下午卖完后剩下{s} - {c} = {r}{unit}。\n答案是{r}。")
    else:
        item = rng.choice(EN_ITEMS)
        q = (f"A shop had {a} {item}. It sold {b} in the morning and {c} in the afternoon. "
             f"How many {item} are left?")
        cot = (f"Step 1: after the morning, {a} - {b} = {s} {item} are left.\n"
               f"Step 2: after the afternoon, {s} - {c} = {r} {item} are left.\nThe answer is {r}.")
    return q, cot


def _pages(rng: random.Random, zh: bool) -> Problem:
    a, b, c = rng.randint(3, 15), rng.randint(2, 7), rng.randint(1, 30)
    s, r = a * b, a * b + c
    if zh:
        name = rng.choice(ZH_NAMES)
        q = f"{name}每天读{a}页书，读了{b}天，第{b + 1}天又读了{c}页。{name}一共读了多少页？"
        cot = f"第一步：前{b}天读了{a} × {b} = {s}页。\n第二步：再加上{c}页，一共{s} + {c} = {r}页。\n答案是{r}。"
    else:
        name = rng.choice(EN_NAMES)
        q = (f"{name} reads {a} pages a day for {b} days and then {c} more pages. "
             f"How many pages does {name} read in total?")
        cot = (f"Step 1: in {b} days {name} reads {a} × {b} = {s} pages.\n"
               f"Step 2: with {c} more pages the total is {s} + {c} = {r} pages.\nThe answer is {r}.")
    return q, cot


GENERATORS: list[Callable[[random.Random, bool], Problem]] = [_buy_give, _boxes, _share, _shop, _pages]
INSTRUCTION = {
    False: "Solve the math word problem step by step.",
    True: "请一步一步地解答下面的数学应用题。",
}


def generate(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, heldout) records; the two splits share no question."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_heldout:
        zh = len(records) % 2 == 1  # alternate languages: every split is half EN, half ZH
        question, answer = rng.choice(GENERATORS)(rng, zh)
        if question in seen:
            continue
        seen.add(question)
        records.append({"instruction": INSTRUCTION[zh], "input": question, "output": answer})
    return records[n_heldout:], records[:n_heldout]


def _write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).parent / "demo"))
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--n_heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)
    train, heldout = generate(args.n_train, args.n_heldout, args.seed)
    out = Path(args.out_dir)
    _write_json(out / "demo_train.json", train)
    _write_json(out / "demo_heldout.json", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
