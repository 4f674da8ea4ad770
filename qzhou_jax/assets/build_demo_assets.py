#!/usr/bin/env python3
"""Deterministic generator for the bundled demo dataset and demo tokenizer.

Everything written by this script is synthetic: the entities (dishes, exoplanets,
football clubs, libraries, medicines, towns, ...) are invented by combining word parts,
and every sentence comes from the hand-written templates below. Nothing is copied from
or derived from an existing dataset.

Outputs (relative to ``out_dir``, default: the folder holding this script)::

    demo/retrieval_{train,heldout}.jsonl       {"query", "pos": [1], "neg": [4], "instruction"}
    demo/sts_{train,heldout}.jsonl             {"text1", "text2", "score" in [0, 5]}
    demo/classification_{train,heldout}.jsonl  {"text", "label"}
    demo/README.md
    tokenizer/tokenizer.json                   byte-level BPE, <= 2048 tokens incl. specials
    tokenizer/tokenizer_config.json
    tokenizer/special_tokens_map.json

The train and heldout splits use disjoint entities, so no text is shared between them.
Running the script twice gives byte-identical files (fixed seeds, string-seeded
``random.Random``, sorted tokenizer corpus). Only the standard library and ``tokenizers``
are needed.

Usage::

    python3 qzhou_jax/assets/build_demo_assets.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
from dataclasses import dataclass, field
from typing import Callable

SEED = 20250611
INSTRUCTION = "Given a question, retrieve passages that answer the question"
PROMPT_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"  # as in qzhou_jax.tokenizer
N_ENTITIES = 16  # per topic block
N_HELDOUT_ENTITIES = 3  # per topic block; the rest are train entities
RETRIEVAL_LIMIT = {"train": None, "heldout": 300}  # None: one record per fact
STS_COUNTS = {"train": 1500, "heldout": 400}
CLS_COUNTS = {"train": 1200, "heldout": 300}

VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_MAX_LENGTH = 32768
# Qwen2's pre-tokenisation regex (split on letters / single digits / punctuation / spaces).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def a_an(s: str) -> str:
    return ("an " if s[:1].lower() in "aeiou" else "a ") + s


# ---------------------------------------------------------------------------------------
# Shared word pools (all invented / generic)
# ---------------------------------------------------------------------------------------
FIRST_NAMES = ["Alma", "Bruno", "Clara", "Dario", "Elena", "Felix", "Greta", "Hugo", "Ines",
               "Jonas", "Kira", "Lena", "Marek", "Nadia", "Oscar", "Petra", "Rafael", "Sofia",
               "Tomas", "Una", "Viktor", "Wanda", "Yusuf", "Zora", "Anton", "Beatrix", "Cyril",
               "Delia", "Emil", "Flora"]
LAST_NAMES = ["Albright", "Brennan", "Castell", "Dunmore", "Ellery", "Farrow", "Galloway",
              "Hartley", "Ibarra", "Jessop", "Kowal", "Lindqvist", "Marlowe", "Novak", "Okafor",
              "Pellegrini", "Quayle", "Rasmussen", "Sandoval", "Thorne", "Underhill", "Varga",
              "Whitlock", "Yardley", "Zeller", "Ashdown", "Bellamy", "Corrigan", "Devereux",
              "Fairweather"]
EN_TOWN_A = ["Ash", "Bram", "Cal", "Dun", "Elm", "Fen", "Gal", "Hart", "Ives", "Kel", "Lor",
             "Mar", "Nor", "Oak", "Pen", "Rook", "Sel", "Tarn", "Wex", "Bar", "Stam", "Hol"]
EN_TOWN_B = ["bury", "ford", "wick", "mere", "stead", "field", "ton", "holm", "gate", "moor",
             "dale", "haven", "by", "worth"]
ZH_SURNAMES = ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴", "徐", "孙", "马", "朱",
               "胡", "郭"]
ZH_GIVEN = ["建国", "志强", "海涛", "晓明", "立新", "文博", "子豪", "振华", "明远", "国栋", "嘉伟",
            "少锋", "永辉", "俊杰", "家乐", "宏宇"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def zh_person(rng: random.Random) -> str:
    return rng.choice(ZH_SURNAMES) + rng.choice(ZH_GIVEN)


def en_town(rng: random.Random) -> str:
    return rng.choice(EN_TOWN_A) + rng.choice(EN_TOWN_B)


# ---------------------------------------------------------------------------------------
# Topic / facet definitions
# ---------------------------------------------------------------------------------------
@dataclass
class Facet:
    key: str
    val: Callable[[random.Random], dict]
    q: list[str]  # queries (no answer)
    s: list[str]  # statements that answer; all render the same fact (paraphrases)
    p: list[str]  # incomplete answers: entity + facet words, but no answer


@dataclass
class Topic:
    label: str
    lang: str
    name: Callable[[random.Random], str]
    facets: list[Facet]
    extras: list[str] = field(default_factory=list)  # entity-neutral extra sentences


def F(key, val, q, s, p):
    return Facet(key, val, q, s, p)


def topics_en() -> list[Topic]:
    T: list[Topic] = []

    # ----------------------------------------------------------------- cooking
    adjs = ["smoky", "spiced", "creamy", "lemony", "garlicky", "slow-cooked", "crispy",
            "honey-glazed", "herbed", "peppery", "golden", "rustic"]
    ingr = ["lentil", "chickpea", "mushroom", "pumpkin", "salmon", "chicken", "aubergine", "beef",
            "spinach", "barley", "prawn", "potato", "leek", "tofu"]
    dish = ["stew", "pie", "risotto", "curry", "soup", "flatbread", "casserole", "salad", "tart",
            "noodle bowl", "broth", "gratin"]
    regions = ["the {P} valley", "the hill villages around {P}", "the fishing port of {P}",
               "the {P} lowlands", "the market town of {P}", "the farming country north of {P}"]
    T.append(Topic("cooking", "en",
        lambda r: f"the {r.choice(adjs)} {r.choice(ingr)} {r.choice(dish)}",
        [
            F("cook_time", lambda r: {"m": r.choice(range(15, 125, 5))},
              ["How long does {n} take to cook?", "What is the cooking time for {n}?",
               "How many minutes should {n} stay on the heat?"],
              ["{N} needs about {m} minutes of cooking before it is ready.",
               "Allow roughly {m} minutes to cook {n} from start to finish.",
               "Cooking {n} takes around {m} minutes in total."],
              ["The cooking time for {n} depends on your pan, your stove and the size of the pieces.",
               "Recipes disagree about how long {n} should cook, so check it often."]),
            F("spice", lambda r: {"sp": r.choice(["smoked paprika", "cumin", "saffron", "star anise",
                                                  "fennel seed", "sumac", "nutmeg", "cardamom",
                                                  "turmeric", "coriander seed", "black pepper",
                                                  "fresh ginger"])},
              ["Which spice gives {n} its flavour?", "What is the main seasoning in {n}?",
               "What spice is used in {n}?"],
              ["The signature flavour of {n} comes from {sp}.",
               "{N} is seasoned mainly with {sp}.",
               "A generous pinch of {sp} gives {n} its character."],
              ["{N} is famous for its seasoning, although every family uses a different blend.",
               "The spices in {n} are added near the end so they keep their aroma."]),
            F("origin", lambda r: {"rg": r.choice(regions).format(P=en_town(r))},
              ["Where does {n} come from?", "What is the origin of the recipe for {n}?",
               "Which region is {n} from?"],
              ["{N} was first cooked in {rg}.",
               "The recipe for {n} originated in {rg}.",
               "{N} comes from {rg}, where it is still a favourite."],
              ["Several regions claim to have invented {n}, and the debate goes on.",
               "Nobody is quite sure where the recipe for {n} began."]),
            F("serve_with", lambda r: {"sd": r.choice(["steamed rice", "crusty bread",
                                                       "a crisp green salad", "garlic yoghurt",
                                                       "buttered noodles", "roast potatoes",
                                                       "warm flatbread", "pickled vegetables",
                                                       "soft polenta", "couscous",
                                                       "sautéed greens", "mashed sweet potato"])},
              ["What should I serve with {n}?", "What is a good side dish for {n}?",
               "What goes well with {n}?"],
              ["{N} is traditionally served with {sd}.",
               "Serve {n} alongside {sd} for a complete meal.",
               "Most people eat {n} with {sd} on the side."],
              ["What to serve with {n} is largely a matter of personal taste.",
               "{N} can be paired with many side dishes, depending on the season."]),
            F("servings", lambda r: {"k": r.choice(range(2, 9))},
              ["How many people does {n} serve?", "How many portions does one batch of {n} make?",
               "Is one pot of {n} enough for a family?"],
              ["One batch of {n} serves {k} people.",
               "A standard recipe for {n} makes {k} portions.",
               "{N} feeds about {k} people per batch."],
              ["The number of portions {n} makes depends on how hungry your guests are.",
               "{N} is easy to scale up if you are cooking for a crowd."]),
            F("storage", lambda r: {"d": r.choice(range(2, 6)),
                                    "fz": r.choice(["freezes well for up to three months",
                                                    "does not freeze well",
                                                    "can be frozen for one month"])},
              ["How long does {n} keep in the fridge?", "How should leftovers of {n} be stored?",
               "Can I keep {n} for a few days?"],
              ["Leftovers of {n} keep for {d} days in the fridge, and the dish {fz}.",
               "Stored in a covered container, {n} lasts {d} days in the refrigerator and {fz}.",
               "{N} stays fresh in the fridge for {d} days and {fz}."],
              ["Leftovers of {n} should be cooled quickly before they are put away.",
               "How long {n} keeps depends on how it was cooked and stored."]),
        ],
        ["It is a popular choice for weeknight dinners.", "Many home cooks make it in a single pot.",
         "The dish is often prepared for family gatherings.", "It tastes even better the next day.",
         "Food writers often describe it as comfort food."]))

    # ----------------------------------------------------------------- astronomy
    st_a = ["Tov", "Kel", "Mir", "Zan", "Oph", "Ves", "Lyr", "Cor", "Ald", "Nem", "Sar", "Hel",
            "Bor", "Quel"]
    st_b = ["ara", "ion", "exa", "uli", "ora", "eth", "is", "an"]
    gases = ["hydrogen", "helium", "carbon dioxide", "methane", "water vapour", "nitrogen",
             "sodium vapour", "ammonia"]
    methods = ["the transit method", "radial velocity measurements", "direct imaging",
               "gravitational microlensing", "transit timing variations"]
    T.append(Topic("astronomy", "en",
        lambda r: f"{r.choice(st_a)}{r.choice(st_b)}-{r.randint(1, 40)} {r.choice('bcd')}",
        [
            F("period", lambda r: {"d": round(r.uniform(0.8, 400), 1)},
              ["How long is a year on {n}?", "What is the orbital period of {n}?",
               "How many days does {n} take to orbit its star?"],
              ["{N} completes one orbit around its star every {d} days.",
               "A year on {n} lasts {d} Earth days.",
               "The orbital period of the planet {n} is {d} days."],
              ["Astronomers are still refining the orbit of {n} with new observations.",
               "The orbit of {n} is slightly eccentric, which makes its seasons uneven."]),
            F("distance", lambda r: {"ly": r.choice(range(12, 3000))},
              ["How far away is {n}?", "What is the distance from Earth to {n}?",
               "How many light-years away is the planet {n}?"],
              ["{N} lies about {ly} light-years from Earth.",
               "Light from the system of {n} takes roughly {ly} years to reach us.",
               "The planet {n} is located {ly} light-years away from the Sun."],
              ["The distance to {n} was hard to measure because its star is faint.",
               "Estimates of how far away {n} is have changed several times."]),
            F("discovery", lambda r: {"y": r.randint(1998, 2024), "m": r.choice(methods),
                                      "ob": en_town(r)},
              ["When was {n} discovered?", "How was the exoplanet {n} found?",
               "Who discovered {n} and when?"],
              ["{N} was discovered in {y} by a team at the {ob} Observatory using {m}.",
               "Astronomers at the {ob} Observatory found {n} in {y} through {m}.",
               "The discovery of {n} in {y} came from {m} carried out at the {ob} Observatory."],
              ["The discovery of {n} was announced after years of careful checking.",
               "{N} was one of several planets reported in the same survey."]),
            F("temperature", lambda r: {"t": r.choice(range(-220, 1400, 5))},
              ["How hot is {n}?", "What is the surface temperature of {n}?",
               "Is {n} hot or cold?"],
              ["The surface of {n} reaches about {t} degrees Celsius.",
               "{N} has an estimated surface temperature of {t}°C.",
               "Models put the temperature on {n} at roughly {t} degrees Celsius."],
              ["The temperature of {n} is uncertain because its atmosphere is poorly understood.",
               "{N} may have very different temperatures on its day and night sides."]),
            F("mass", lambda r: {"x": round(r.uniform(0.3, 300), 1)},
              ["How massive is {n}?", "What is the mass of {n}?",
               "How heavy is the planet {n} compared with Earth?"],
              ["{N} is about {x} times as massive as Earth.",
               "The mass of {n} is roughly {x} Earth masses.",
               "Measurements give {n} a mass of {x} times that of Earth."],
              ["The mass of {n} is hard to pin down without more radial velocity data.",
               "Whether {n} is rocky or gaseous depends on a mass that is still debated."]),
            F("atmosphere", lambda r: {"g": r.choice(gases)},
              ["What is the atmosphere of {n} made of?", "Does {n} have an atmosphere?",
               "Which gas dominates the air on {n}?"],
              ["The atmosphere of {n} is dominated by {g}.",
               "Spectra show that {n} has a thick atmosphere rich in {g}.",
               "{N} is wrapped in an atmosphere made mostly of {g}."],
              ["Telescopes have tried to study the atmosphere of {n}, but the signal is weak.",
               "Whether {n} has any atmosphere at all remains an open question."]),
        ],
        ["Its host star is smaller and cooler than the Sun.",
         "The system is visible from the southern hemisphere.",
         "Further observations are planned with space telescopes.",
         "It is one of the better-studied worlds in its constellation."]))

    # ----------------------------------------------------------------- gardening
    cultivars = ["Amber Vale", "Blue Heron", "Copper Crown", "Dawn Mist", "Emerald Lace",
                 "Frost Queen", "Golden Hour", "Honey Bell", "Ivory Star", "June Blush",
                 "Kingfisher", "Lady Ruth", "Moonbeam", "Northern Light", "Old Rose", "Pearl Drop",
                 "Ruby Glow", "Silver Fern", "Summer Dancer", "Velvet Night"]
    plants = ["tomato", "lavender", "rose", "sweet pea", "dahlia", "runner bean", "courgette",
              "hydrangea", "basil", "strawberry", "clematis", "tulip"]
    T.append(Topic("gardening", "en",
        lambda r: f"the {r.choice(cultivars)} {r.choice(plants)}",
        [
            F("sunlight", lambda r: {"l": r.choice(["full sun", "partial shade", "dappled shade",
                                                    "at least six hours of direct sun",
                                                    "morning sun and afternoon shade",
                                                    "bright but indirect light"])},
              ["How much sun does {n} need?", "Does {n} grow in shade?",
               "What light conditions suit {n}?"],
              ["{N} grows best in {l}.", "Plant {n} where it gets {l}.",
               "For strong growth, give {n} {l}."],
              ["{N} is fairly adaptable, although light levels affect how well it flowers.",
               "Gardeners often move {n} around until they find the right spot."]),
            F("watering", lambda r: {"k": r.randint(2, 10)},
              ["How often should I water {n}?", "How much water does {n} need?",
               "What is the watering schedule for {n}?"],
              ["Water {n} every {k} days during the growing season.",
               "{N} needs a deep watering about once every {k} days.",
               "During summer, {n} should be watered at intervals of {k} days."],
              ["Overwatering is a common mistake with {n}, so check the soil first.",
               "How often {n} needs water depends on the weather and the size of the pot."]),
            F("planting", lambda r: {"mo": r.choice(MONTHS[1:10])},
              ["When should I plant {n}?", "What is the best month to plant {n}?",
               "When is the planting season for {n}?"],
              ["The best time to plant {n} is in {mo}.",
               "Gardeners usually plant {n} in {mo}.",
               "{N} should go into the ground in {mo}."],
              ["Planting {n} too early can expose it to a late frost.",
               "The right planting date for {n} varies from one garden to another."]),
            F("spacing", lambda r: {"cm": r.choice(range(15, 125, 5))},
              ["How far apart should I plant {n}?", "What spacing does {n} need?",
               "How much room does {n} need in the bed?"],
              ["Space {n} plants about {cm} centimetres apart.",
               "{N} needs around {cm} cm of space between plants.",
               "Set {n} {cm} centimetres apart so air can circulate."],
              ["Giving {n} enough room helps prevent disease.",
               "Crowded plants of {n} tend to produce weaker growth."]),
            F("pest", lambda r: {"pe": r.choice(["aphids", "slugs", "whitefly", "spider mites",
                                                 "vine weevils", "caterpillars", "thrips",
                                                 "earwigs", "snails"])},
              ["What pests attack {n}?", "Which insect is the biggest problem for {n}?",
               "What eats {n}?"],
              ["The main pests of {n} are {pe}.", "{N} is often attacked by {pe}.",
               "Watch out for {pe}, which love to feed on {n}."],
              ["{N} can suffer from pests, especially in a warm, dry summer.",
               "Healthy plants of {n} usually recover quickly from pest damage."]),
            F("soil", lambda r: {"so": r.choice(["well-drained sandy soil", "rich loamy soil",
                                                 "moist clay soil", "slightly acidic soil",
                                                 "chalky alkaline soil",
                                                 "light soil with plenty of compost"])},
              ["What soil does {n} like?", "Which type of soil is best for {n}?",
               "Will {n} grow in clay soil?"],
              ["{N} thrives in {so}.", "The ideal ground for {n} is {so}.",
               "Plant {n} in {so} for the best results."],
              ["Improving the soil before planting {n} is always worthwhile.",
               "{N} will tolerate several soil types, but some suit it better than others."]),
        ],
        ["It is a favourite in cottage gardens.", "It also grows well in large containers.",
         "Many allotment holders grow it every year.", "Mulching in spring helps it through dry spells."]))

    # ----------------------------------------------------------------- football
    suffixes = ["Rovers", "United", "Athletic", "City", "Albion", "Wanderers", "Town", "Rangers",
                "Harriers", "Villa"]
    ground_w = ["Mill", "Victoria", "Beacon", "Meadow", "Station", "Castle", "Chapel", "Brook",
                "Foundry", "Lark"]
    ground_s = ["Park", "Road", "Lane", "Ground", "Stadium", "Field"]
    nicks = ["the Foxes", "the Magpies", "the Hornets", "the Badgers", "the Seagulls", "the Owls",
             "the Herons", "the Robins", "the Stags", "the Otters", "the Kestrels", "the Ravens"]
    colours = ["red", "blue", "white", "black", "yellow", "green", "claret", "amber", "navy"]
    T.append(Topic("football", "en",
        lambda r: f"{en_town(r)} {r.choice(suffixes)}",
        [
            F("stadium", lambda r: {"st": f"{r.choice(ground_w)} {r.choice(ground_s)}",
                                    "cap": f"{r.randint(4, 60) * 1000 + r.choice(range(0, 1000, 50)):,}"},
              ["Where do {n} play their home games?", "What is the name of the stadium of {n}?",
               "How many fans fit in the home ground of {n}?"],
              ["{N} play their home matches at {st}, which holds {cap} spectators.",
               "The home ground of {n} is {st}, with room for {cap} fans.",
               "{st} is home to {n} and has a capacity of {cap}."],
              ["{N} have talked about moving to a new stadium for years.",
               "The stadium of {n} has been renovated several times since the club was formed."]),
            F("founded", lambda r: {"y": r.randint(1870, 1960),
                                    "wp": r.choice(["mill", "railway works", "shipyard", "brewery",
                                                    "colliery", "ironworks"])},
              ["When were {n} founded?", "How old is the football club {n}?",
               "In which year was {n} established?"],
              ["{N} were founded in {y} by workers from the local {wp}.",
               "The club {n} was established in {y}, when employees of the town {wp} formed a team.",
               "{N} trace their history back to {y} and the {wp} workers who started the club."],
              ["{N} are one of the oldest clubs in the region, although records from the early years are patchy.",
               "The founding of {n} is celebrated every year with a special match."]),
            F("manager", lambda r: {"p": person(r), "y": r.randint(2012, 2024)},
              ["Who is the manager of {n}?", "Who coaches {n}?",
               "Who is in charge of {n} at the moment?"],
              ["{N} are managed by {p}, who took charge in {y}.",
               "{p} has been the head coach of {n} since {y}.",
               "Since {y}, {n} have been led by manager {p}."],
              ["{N} have had several managers in recent seasons.",
               "The board of {n} is reportedly reviewing the coaching staff."]),
            F("nickname", lambda r: {"nk": r.choice(nicks),
                                     "rs": r.choice(["the emblem on the town crest",
                                                     "an animal that lived at the old ground",
                                                     "a newspaper headline from the 1920s",
                                                     "a famous cup run",
                                                     "the woods near the stadium"])},
              ["What is the nickname of {n}?", "What do fans call {n}?",
               "Why do {n} have their nickname?"],
              ["{N} are nicknamed {nk}, a name that comes from {rs}.",
               "Fans call {n} {nk} because of {rs}.",
               "The nickname of {n}, {nk}, refers to {rs}."],
              ["{N} have had more than one nickname during their long history.",
               "Supporters of {n} still argue about where the club's nickname came from."]),
            F("colours", lambda r: dict(zip(("c1", "c2"), r.sample(colours, 2))),
              ["What colours do {n} wear?", "What are the kit colours of {n}?",
               "What colour is the home shirt of {n}?"],
              ["{N} play in {c1} shirts with {c2} shorts.",
               "The home kit of {n} is {c1} and {c2}.",
               "{N} wear {c1} and {c2} at home games."],
              ["{N} change their kit design every season.",
               "The away kit of {n} is unveiled each summer."]),
            F("scorer", lambda r: {"p": person(r), "g": r.randint(80, 320)},
              ["Who is the all-time top scorer of {n}?", "Who has scored the most goals for {n}?",
               "What is the goalscoring record at {n}?"],
              ["The record goalscorer of {n} is {p}, with {g} goals.",
               "{p} scored {g} goals for {n}, more than anyone else in club history.",
               "No player has beaten the {g} goals that {p} scored for {n}."],
              ["{N} have produced many prolific strikers over the years.",
               "The goalscoring record at {n} has stood for decades."]),
        ],
        ["The club also runs a youth academy.", "Supporters travel in large numbers to away games.",
         "The team was promoted two seasons ago.", "Local derbies draw the biggest crowds of the year."]))

    # ----------------------------------------------------------------- programming
    lib_a = ["fast", "tidy", "py", "go", "micro", "tiny", "hyper", "open", "swift", "lazy",
             "snap", "net", "easy", "bright"]
    lib_b = ["quill", "relay", "forge", "grid", "parse", "queue", "cache", "stream", "lint",
             "sched", "vault", "mesh", "pipe"]
    purposes = ["parsing YAML files", "scheduling background jobs", "validating JSON schemas",
                "rendering HTML templates", "compressing log files", "building command-line interfaces",
                "connecting to PostgreSQL databases", "resizing images", "sending email notifications",
                "caching HTTP responses", "generating PDF reports", "handling WebSocket connections",
                "profiling memory usage"]
    langs = ["Rust", "Go", "Python", "C++", "TypeScript", "Java", "Kotlin", "Zig", "C", "Haskell",
             "Elixir", "Swift"]
    T.append(Topic("programming", "en",
        lambda r: f"{r.choice(lib_a)}{r.choice(lib_b)}",
        [
            F("purpose", lambda r: {"pu": r.choice(purposes)},
              ["What is {n} used for?", "What does the {n} library do?", "What problem does {n} solve?"],
              ["The {n} library is used for {pu}.", "Developers use {n} mainly for {pu}.",
               "The {n} package provides tools for {pu}."],
              ["The documentation of {n} explains its goals in the introduction.",
               "The {n} project has grown far beyond its original purpose."]),
            F("language", lambda r: {"la": r.choice(langs)},
              ["What language is {n} written in?", "Which programming language was used to build {n}?",
               "Is {n} written in Rust?"],
              ["The {n} library is written in {la}.", "{la} is the language used to implement {n}.",
               "The source code of {n} is written entirely in {la}."],
              ["The {n} codebase has been rewritten once since its first release.",
               "Contributors to {n} must follow a strict coding style."]),
            F("license", lambda r: {"li": r.choice(["MIT", "Apache-2.0", "BSD-3-Clause", "GPL-3.0",
                                                    "MPL-2.0", "LGPL-2.1", "ISC"])},
              ["What license does {n} use?", "Is {n} open source?",
               "Under which license is {n} released?"],
              ["The {n} library is released under the {li} license.",
               "The {n} project is open source and distributed under the {li} license.",
               "You may use {n} under the terms of the {li} license."],
              ["The license of {n} is described in a file at the root of the repository.",
               "The {n} maintainers once discussed changing the license."]),
            F("version", lambda r: {"v": f"{r.randint(0, 6)}.{r.randint(0, 24)}.{r.randint(0, 12)}",
                                    "mo": r.choice(MONTHS), "yr": r.randint(2019, 2025)},
              ["What is the latest version of {n}?", "When was the most recent {n} release?",
               "Which version of {n} is current?"],
              ["The latest release of {n} is version {v}, published in {mo} {yr}.",
               "Version {v} of {n} came out in {mo} {yr} and is the current stable release.",
               "Released in {mo} {yr}, {n} {v} is the newest version."],
              ["New versions of {n} appear irregularly.",
               "The {n} changelog lists every release since the project began."]),
            F("author", lambda r: {"p": person(r), "y": r.randint(2005, 2022)},
              ["Who created {n}?", "Who is the author of {n}?", "Who started the {n} project?"],
              ["The {n} library was created by {p} in {y}.", "{p} started the {n} project in {y}.",
               "The original author of {n} is {p}, who wrote the first version in {y}."],
              ["The {n} project is now maintained by a group of volunteers.",
               "The history of {n} is described on the project website."]),
            F("config", lambda r: {"cf": r.choice(["a TOML file", "a YAML file", "environment variables",
                                                   "a JSON file", "an INI file", "command-line flags"])},
              ["How do I configure {n}?", "Where does {n} read its settings from?",
               "What configuration format does {n} use?"],
              ["The {n} library reads its settings from {cf}.", "You configure {n} through {cf}.",
               "All options of {n} are set with {cf}."],
              ["The {n} library has many configuration options, most of which are rarely needed.",
               "Configuring {n} is covered in a separate chapter of the manual."]),
        ],
        ["It has several thousand stars on GitHub.", "The project welcomes first-time contributors.",
         "Its test suite runs on every pull request.", "It has no dependencies outside the standard library."]))

    # ----------------------------------------------------------------- banking
    banks = ["Northgate", "Harbour", "Greystone", "Meridian", "Oakfield", "Riverside", "Kingsway",
             "Summit", "Lakeland", "Ironbridge", "Westmoor", "Brightwater"]
    prods = ["Easy Saver", "Everyday Current", "Young Saver", "Premier Current", "Fixed Bond",
             "Family Saver", "Student", "Online Saver", "Flex Plus", "Reward Current"]
    T.append(Topic("banking", "en",
        lambda r: f"the {r.choice(banks)} {r.choice(prods)} account",
        [
            F("interest", lambda r: {"ir": f"{r.choice(range(10, 551, 5)) / 100:.2f}"},
              ["What interest rate does {n} pay?", "How much interest do I earn on {n}?",
               "What is the savings rate of {n}?"],
              ["{N} pays {ir}% interest per year.",
               "Balances in {n} earn an annual interest rate of {ir}%.",
               "The interest rate on {n} is currently {ir}% a year."],
              ["The interest rate on {n} can change with the central bank rate.",
               "{N} pays interest, but the rate depends on your balance."]),
            F("fee", lambda r: {"f": f"{r.choice(range(100, 1501, 25)) / 100:.2f}"},
              ["Does {n} have a monthly fee?", "How much does {n} cost per month?",
               "What are the account fees for {n}?"],
              ["{N} charges a monthly fee of £{f}.", "There is a £{f} monthly charge for {n}.",
               "Customers pay £{f} each month to keep {n} open."],
              ["The fees for {n} are listed in the bank's tariff document.",
               "Some customers can have the monthly fee on {n} waived."]),
            F("min_deposit", lambda r: {"d": f"{r.choice([1, 10, 20, 50, 100, 250, 500, 1000, 2000, 5000]):,}"},
              ["What is the minimum deposit for {n}?", "How much money do I need to open {n}?",
               "Is there a minimum balance to open {n}?"],
              ["You need at least £{d} to open {n}.",
               "{N} requires a minimum opening deposit of £{d}.",
               "The minimum amount to open {n} is £{d}."],
              ["Opening {n} can be done online or in a branch.",
               "The deposit rules for {n} were updated last year."]),
            F("withdrawals", lambda r: {"k": r.choice(range(2, 25))},
              ["How many withdrawals can I make from {n}?", "Are withdrawals from {n} limited?",
               "Can I take money out of {n} at any time?"],
              ["{N} allows {k} free withdrawals per year.",
               "You can make up to {k} withdrawals a year from {n} without penalty.",
               "Withdrawals from {n} are limited to {k} per year."],
              ["Withdrawal rules for {n} are explained in the account terms.",
               "Taking money out of {n} may affect the interest you earn."]),
            F("foreign", lambda r: {"ff": f"{r.choice(range(0, 36, 1)) / 10:.1f}"},
              ["Can I use {n} abroad?", "What is the foreign transaction fee on {n}?",
               "Does {n} charge for card payments overseas?"],
              ["Card payments abroad with {n} carry a {ff}% foreign transaction fee.",
               "{N} adds a fee of {ff}% to purchases made in other currencies.",
               "Spending overseas with the card linked to {n} costs {ff}% of each transaction."],
              ["The debit card linked to {n} works in most countries.",
               "Customers travelling abroad should tell the bank before using {n}."]),
            F("eligibility", lambda r: {"a": r.randint(11, 25)},
              ["Who can open {n}?", "What is the minimum age for {n}?", "Am I eligible for {n}?"],
              ["{N} is open to UK residents aged {a} or over.",
               "You must be at least {a} years old to apply for {n}.",
               "Applicants for {n} need to be {a} or older and live in the UK."],
              ["Eligibility for {n} is checked when you apply.",
               "The bank may ask for proof of identity before opening {n}."]),
        ],
        ["It can be managed through the mobile app.", "Statements are sent every month.",
         "The account is covered by the deposit protection scheme.",
         "Customer support is available by phone and chat."]))

    # ----------------------------------------------------------------- travel
    tv_a = ["Porta", "Cala", "Vila", "Monte", "Rocca", "Santo", "Mira", "Fonte", "Torre", "Bella",
            "Casa", "Riva"]
    tv_b = ["vella", "serra", "fiora", "nera", "luce", "mara", "lunga", "verde", "dora", "brina"]
    hubs = ["Alvara", "Belmonte", "Corvino", "Delmare", "Estrela", "Ferrano", "Granvia", "Lusara"]
    sights = ["the ruined hilltop castle", "the old lighthouse", "the painted harbour",
              "the cathedral with its blue dome", "the cliffside monastery", "the underground caves",
              "the Roman bridge", "the botanical gardens", "the salt lagoons", "the clock tower"]
    T.append(Topic("travel", "en",
        lambda r: r.choice(tv_a) + r.choice(tv_b),
        [
            F("best_time", lambda r: (lambda i, k: {"m1": MONTHS[i], "m2": MONTHS[(i + k) % 12]})(
                r.randint(0, 11), r.randint(1, 3)),
              ["When is the best time to visit {n}?", "What is the best season for a trip to {n}?",
               "When should I go to {n}?"],
              ["The best time to visit {n} is between {m1} and {m2}.",
               "Travellers find {n} at its best from {m1} to {m2}.",
               "Plan a trip to {n} between {m1} and {m2} for the most pleasant weather."],
              ["{N} can be visited all year, though each season has its drawbacks.",
               "Prices in {n} rise sharply during the busiest months."]),
            F("getting_there", lambda r: {"tr": r.choice(["train", "ferry", "bus", "regional flight"]),
                                          "hub": r.choice(hubs), "h": r.randint(1, 9)},
              ["How do I get to {n}?", "How long does it take to reach {n}?",
               "What is the best way to travel to {n}?"],
              ["{N} is reached by {tr} from {hub}, a journey of about {h} hours.",
               "The easiest way to get to {n} is the {tr} from {hub}, which takes {h} hours.",
               "From {hub}, a {tr} brings you to {n} in roughly {h} hours."],
              ["Getting to {n} is part of the adventure.",
               "Transport links to {n} are better in summer than in winter."]),
            F("attraction", lambda r: {"at": r.choice(sights)},
              ["What is the main attraction in {n}?", "What should I see in {n}?",
               "What is {n} famous for?"],
              ["The main sight in {n} is {at}.", "Most visitors come to {n} to see {at}.",
               "{N} is best known for {at}."],
              ["{N} has plenty of sights, but opening hours are short in winter.",
               "Guidebooks disagree about what to see first in {n}."]),
            F("food", lambda r: {"fo": r.choice(["grilled sardines", "almond biscuits", "saffron rice",
                                                 "chestnut soup", "lemon cake", "octopus stew",
                                                 "fig tart", "fried courgette flowers",
                                                 "lamb with rosemary", "honey fritters"])},
              ["What food is {n} known for?", "What local dish should I try in {n}?",
               "What do people eat in {n}?"],
              ["The local speciality of {n} is {fo}.",
               "Visitors to {n} should try {fo}, the town's signature dish.",
               "In {n}, almost every restaurant serves {fo}."],
              ["Restaurants in {n} change their menus with the seasons.",
               "{N} has a lively food market, but it closes early."]),
            F("festival", lambda r: {"fe": r.choice(["Lantern Festival", "Festival of the Sea",
                                                     "Harvest Fair", "Feast of Saint Aurelio",
                                                     "Flower Parade", "Night of Bonfires",
                                                     "Olive Festival"]),
                                     "mo": r.choice(MONTHS)},
              ["Is there a festival in {n}?", "When is the annual festival in {n}?",
               "What events take place in {n} each year?"],
              ["Every {mo}, {n} celebrates the {fe} with music and processions.",
               "The {fe} takes place in {n} each {mo}.",
               "{N} hosts the {fe} every year in {mo}."],
              ["{N} holds several local events, but dates change from year to year.",
               "Festival weeks in {n} fill the hotels quickly."]),
            F("stay", lambda r: {"sa": r.choice(["small guesthouses in the old quarter",
                                                 "a restored farmhouse outside town",
                                                 "family-run hotels by the harbour",
                                                 "campsites along the beach",
                                                 "apartments above the main square"])},
              ["Where should I stay in {n}?", "What accommodation is available in {n}?",
               "Are there hotels in {n}?"],
              ["Most visitors to {n} stay in {sa}.",
               "The best accommodation in {n} is found in {sa}.",
               "For a night in {n}, look for {sa}."],
              ["Accommodation in {n} should be booked well in advance.",
               "Prices for rooms in {n} vary widely through the year."]),
        ],
        ["The old town is easy to explore on foot.", "English is widely spoken in shops and hotels.",
         "The coastline nearby is ideal for walking.", "Summer evenings are lively in the main square."]))

    # ----------------------------------------------------------------- music
    band_a = ["Velvet", "Paper", "Neon", "Silver", "Hollow", "Midnight", "Electric", "Quiet",
              "Crimson", "Golden", "Wild", "Glass"]
    band_b = ["Harbors", "Comets", "Lanterns", "Sparrows", "Engines", "Orchards", "Tides", "Signals",
              "Arrows", "Gardens", "Mirrors", "Canyons"]
    al_a = ["Northern", "Borrowed", "Slow", "Empty", "Bright", "Falling", "Open", "Second", "Lost",
            "Hidden"]
    al_b = ["Rooms", "Weather", "Letters", "Rivers", "Hours", "Streets", "Skies", "Stations", "Fires",
            "Windows"]
    T.append(Topic("music", "en",
        lambda r: f"The {r.choice(band_a)} {r.choice(band_b)}",
        [
            F("genre", lambda r: {"ge": r.choice(["indie rock", "synth-pop", "folk", "jazz fusion",
                                                  "post-punk", "dream pop", "bluegrass", "soul",
                                                  "heavy metal", "shoegaze", "ska", "electronic"])},
              ["What kind of music do {n} play?", "What genre are {n}?", "What do {n} sound like?"],
              ["{N} are a {ge} band.", "The music of {n} is usually described as {ge}.",
               "{N} play {ge} with a distinctive sound."],
              ["{N} have changed their style on almost every album.",
               "Critics struggle to put {n} into a single category."]),
            F("debut", lambda r: {"al": f"{r.choice(al_a)} {r.choice(al_b)}", "y": r.randint(1975, 2022)},
              ["What was the first album by {n}?", "When did {n} release their debut album?",
               "What is the name of the debut record of {n}?"],
              ["{N} released their debut album, {al}, in {y}.",
               "The first record by {n} was {al}, which came out in {y}.",
               "{al} ({y}) was the debut album of {n}."],
              ["The debut album by {n} was recorded in just a few weeks.",
               "{N} rarely play songs from their first record live."]),
            F("hometown", lambda r: {"t": en_town(r), "y": r.randint(1970, 2018)},
              ["Where are {n} from?", "Which city did {n} form in?", "When and where were {n} formed?"],
              ["{N} formed in {t} in {y}.", "The band {n} got together in {t} in {y}.",
               "{N} started out in {t}, where they formed in {y}."],
              ["{N} moved between several cities in their early years.",
               "The members of {n} met while they were still at school."]),
            F("singer", lambda r: {"p": person(r)},
              ["Who is the lead singer of {n}?", "Who sings in {n}?", "Who fronts the band {n}?"],
              ["The lead vocalist of {n} is {p}.", "{p} sings and writes most of the lyrics for {n}.",
               "{N} are fronted by singer {p}."],
              ["{N} have had several line-up changes over the years.",
               "The vocals on the first records of {n} were shared by the whole band."]),
            F("hit", lambda r: {"so": f"{r.choice(al_a)} {r.choice(['Heart', 'Road', 'Summer', 'Light', 'Song', 'Dance', 'Morning', 'Ocean'])}",
                                "ch": r.randint(1, 40)},
              ["What is the most famous song by {n}?", "What was the biggest hit of {n}?",
               "Which song by {n} reached the charts?"],
              ["The biggest hit by {n} is \"{so}\", which reached number {ch} in the charts.",
               "\"{so}\" by {n} climbed to number {ch} and remains their best-known song.",
               "{N} are best known for \"{so}\", a number {ch} chart hit."],
              ["{N} have had several songs on the radio.",
               "Fans of {n} disagree about which of their songs is the best."]),
            F("members", lambda r: {"k": r.randint(3, 6),
                                    "ins": r.choice(["a violinist", "two guitarists", "a saxophone player",
                                                     "a cellist", "a drummer and a keyboard player",
                                                     "a trumpet player"])},
              ["How many members are in {n}?", "Who plays in {n}?", "What is the line-up of {n}?"],
              ["{N} are a {k}-piece band featuring {ins}.",
               "The line-up of {n} has {k} members, including {ins}.",
               "There are {k} musicians in {n}, with {ins}."],
              ["The line-up of {n} has changed more than once.",
               "{N} often bring extra musicians on tour."]),
        ],
        ["They tour Europe most summers.", "Their live shows are known for long improvised endings.",
         "The band runs its own small record label.", "They have played at several major festivals."]))

    # ----------------------------------------------------------------- medicine
    drug_a = ["Cor", "Ten", "Lum", "Zar", "Vel", "Dor", "Mer", "Pal", "Quin", "Ros", "Sel", "Tav"]
    drug_b = ["valin", "oprax", "idex", "amore", "ostat", "ifen", "azol", "etrin", "oxil", "umid"]
    T.append(Topic("medicine", "en",
        lambda r: r.choice(drug_a) + r.choice(drug_b),
        [
            F("treats", lambda r: {"c": r.choice(["high blood pressure", "migraine", "seasonal allergies",
                                                  "acid reflux", "mild asthma", "type 2 diabetes",
                                                  "insomnia", "rheumatoid arthritis", "eczema",
                                                  "chronic sinusitis", "gout", "anxiety"])},
              ["What is {n} used to treat?", "What condition is {n} prescribed for?", "What does {n} treat?"],
              ["{N} is prescribed for the treatment of {c}.", "Doctors use {n} to treat {c}.",
               "{N} is a medicine for {c}."],
              ["{N} should only be used under medical supervision.",
               "The approved uses of {n} differ between countries."]),
            F("dose", lambda r: {"mg": r.choice([5, 10, 20, 25, 40, 50, 100, 200, 250, 500]),
                                 "fr": r.choice(["once a day", "twice a day", "three times a day",
                                                 "every eight hours", "once a week"])},
              ["What is the usual dose of {n}?", "How much {n} should an adult take?",
               "How many times a day is {n} taken?"],
              ["The usual adult dose of {n} is {mg} mg taken {fr}.",
               "Adults normally take {mg} mg of {n} {fr}.",
               "{N} is typically given as {mg} mg, {fr}."],
              ["The dose of {n} is adjusted for each patient by the doctor.",
               "Never change your dose of {n} without medical advice."]),
            F("side_effect", lambda r: {"se": r.choice(["headache", "drowsiness", "dry mouth", "nausea",
                                                        "dizziness", "mild stomach upset", "a skin rash",
                                                        "muscle aches", "trouble sleeping"])},
              ["What are the side effects of {n}?", "Does {n} cause side effects?",
               "What is the most common side effect of {n}?"],
              ["The most common side effect of {n} is {se}.",
               "Some patients taking {n} experience {se}.",
               "{N} can cause {se}, especially in the first weeks."],
              ["Like all medicines, {n} can cause side effects.",
               "Report any unusual symptoms while taking {n} to your doctor."]),
            F("drug_class", lambda r: (lambda c: {"cl": c, "acl": a_an(c)})(
                r.choice(["beta blocker", "antihistamine", "proton pump inhibitor", "corticosteroid",
                          "ACE inhibitor", "statin", "anti-inflammatory drug",
                          "calcium channel blocker", "biguanide", "sedative"])),
              ["What type of drug is {n}?", "Which drug class does {n} belong to?", "How does {n} work?"],
              ["{N} belongs to the {cl} class of drugs.", "{N} is {acl}.",
               "Pharmacologically, {n} is classed as {acl}."],
              ["{N} works differently from many older treatments.",
               "The way {n} acts in the body is still being studied."]),
            F("how_to_take", lambda r: {"tk": r.choice(["with food", "on an empty stomach", "at bedtime",
                                                        "with a full glass of water",
                                                        "in the morning before breakfast"])},
              ["Should {n} be taken with food?", "When is the best time to take {n}?",
               "How should I take {n}?"],
              ["{N} should be taken {tk}.", "Take {n} {tk} for best absorption.",
               "Patients are advised to take {n} {tk}."],
              ["How you take {n} can affect how well it works.",
               "The leaflet for {n} includes instructions on timing."]),
            F("interaction", lambda r: {"ix": r.choice(["alcohol", "grapefruit juice", "antacids",
                                                        "blood thinners", "St John's wort",
                                                        "other sedatives", "potassium supplements",
                                                        "ibuprofen"])},
              ["What should I avoid while taking {n}?", "Does {n} interact with other drugs?",
               "What should not be combined with {n}?"],
              ["Avoid {ix} while taking {n}.", "{N} should not be combined with {ix}.",
               "Taking {n} together with {ix} can cause harmful interactions."],
              ["{N} interacts with some medicines, so tell your pharmacist what you take.",
               "Interactions with {n} are listed in the patient leaflet."]),
        ],
        ["It is available only on prescription.", "It comes as tablets and as a liquid.",
         "Generic versions are now available.", "Pharmacists can answer questions about its use."]))

    # ----------------------------------------------------------------- weather
    wx_a = ["Brack", "Corm", "Dray", "Elles", "Fal", "Glen", "Holl", "Kirk", "Lang", "Mor", "Ness",
            "Pryor", "Rad", "Stan", "Thorn", "Wyn"]
    wx_b = ["ton", "bridge", "mouth", "port", "ley", "ham", "stone", "well"]
    T.append(Topic("weather", "en",
        lambda r: r.choice(wx_a) + r.choice(wx_b),
        [
            F("warmest", lambda r: {"mo": r.choice(MONTHS[5:8]), "t": r.randint(14, 38)},
              ["What is the warmest month in {n}?", "How hot does it get in {n} in summer?",
               "What is the average summer temperature in {n}?"],
              ["{mo} is the warmest month in {n}, with an average high of {t}°C.",
               "In {n}, temperatures peak in {mo} at around {t} degrees Celsius.",
               "Summer in {n} is warmest in {mo}, when daytime highs average {t}°C."],
              ["Summers in {n} vary a lot from one year to the next.",
               "{N} sometimes has heatwaves, although they are usually short."]),
            F("rainfall", lambda r: {"mm": f"{r.choice(range(300, 2550, 10)):,}"},
              ["How much rain does {n} get?", "What is the annual rainfall in {n}?", "Is {n} a wet place?"],
              ["{N} receives about {mm} mm of rain per year.",
               "Annual rainfall in {n} averages {mm} millimetres.",
               "Around {mm} mm of rain falls on {n} each year."],
              ["Rainfall in {n} has become less predictable in recent decades.",
               "Rain gauges in {n} have been recording data for over a century."]),
            F("rainiest", lambda r: {"mo": r.choice(MONTHS)},
              ["What is the rainiest month in {n}?", "When does it rain most in {n}?",
               "Which month should I avoid in {n} because of rain?"],
              ["The wettest month in {n} is {mo}.", "Rain falls most heavily on {n} in {mo}.",
               "{mo} brings the most rain to {n}."],
              ["Showers can arrive in {n} at any time of year.",
               "Locals in {n} always carry an umbrella, whatever the month."]),
            F("snow", lambda r: {"k": r.randint(0, 60)},
              ["Does it snow in {n}?", "How many snow days does {n} have?", "How often does {n} see snow?"],
              ["{N} averages {k} days of snowfall each year.", "Snow falls on about {k} days a year in {n}.",
               "Each winter, {n} sees snow on roughly {k} days."],
              ["Snow in {n} rarely settles for long.",
               "Winters in {n} can be cold, but forecasts of snow often prove wrong."]),
            F("wind", lambda r: {"d": r.choice(["north", "north-east", "east", "south-east", "south",
                                                "south-west", "west", "north-west"])},
              ["Which way does the wind usually blow in {n}?", "What is the prevailing wind in {n}?",
               "Is {n} a windy place?"],
              ["The prevailing wind in {n} blows from the {d}.", "Winds in {n} come mostly from the {d}.",
               "{N} is usually swept by winds from the {d}."],
              ["Wind in {n} can change direction quickly when storms pass.",
               "{N} has a weather station that measures wind speed every minute."]),
            F("sunshine", lambda r: {"h": f"{r.choice(range(1000, 3250, 10)):,}"},
              ["How sunny is {n}?", "How many hours of sunshine does {n} get?", "Does {n} get much sun?"],
              ["{N} enjoys around {h} hours of sunshine a year.",
               "On average, the sun shines for {h} hours annually in {n}.",
               "The yearly sunshine total in {n} is about {h} hours."],
              ["Sunshine in {n} is often blocked by low cloud in the morning.",
               "{N} looks sunnier in photographs than it really is."]),
        ],
        ["Forecasters describe its climate as mild.", "The town sits in a sheltered valley.",
         "Weather records there go back to 1870.", "The nearby hills strongly affect the local weather."]))

    # ----------------------------------------------------------------- chemistry
    el_a = ["ver", "tarn", "lum", "zor", "kal", "phen", "mald", "kry", "sol", "ner", "bor", "dex"]
    el_b = ["idium", "inium", "arium", "olium"]
    anions = ["chloride", "oxide", "sulfate", "nitrate", "bromide", "carbonate", "phosphate", "fluoride"]
    T.append(Topic("chemistry", "en",
        lambda r: f"{r.choice(el_a)}{r.choice(el_b)} {r.choice(anions)}",
        [
            F("melting_point", lambda r: {"t": r.choice(range(-40, 1600, 3))},
              ["What is the melting point of {n}?", "At what temperature does {n} melt?",
               "Does {n} melt easily?"],
              ["{N} melts at {t} °C.", "The melting point of {n} is {t} degrees Celsius.",
               "Solid {n} turns to liquid at {t}°C."],
              ["The melting point of {n} depends on how pure the sample is.",
               "Measuring the melting point of {n} requires a sealed tube."]),
            F("appearance", lambda r: {"ap": r.choice(["a pale green powder", "colourless needle-like crystals",
                                                       "a deep blue solid", "a white crystalline powder",
                                                       "a yellow oily liquid", "orange flakes",
                                                       "a grey metallic solid", "violet crystals"])},
              ["What does {n} look like?", "What colour is {n}?", "What is the appearance of {n}?"],
              ["{N} is {ap} at room temperature.", "At room temperature, {n} appears as {ap}.",
               "Pure {n} forms {ap}."],
              ["The colour of {n} can change when it absorbs moisture.",
               "Impurities often alter the appearance of {n}."]),
            F("solubility", lambda r: {"so": r.choice(["dissolves readily in water", "is almost insoluble in water",
                                                       "dissolves slowly in cold water but quickly in hot water",
                                                       "is soluble in ethanol but not in water",
                                                       "reacts violently with water"])},
              ["Is {n} soluble in water?", "Does {n} dissolve in water?", "What solvents dissolve {n}?"],
              ["{N} {so}.", "In the lab, {n} {so}.", "Chemists note that {n} {so}."],
              ["The solubility of {n} has been measured at many temperatures.",
               "Dissolving {n} is a common step in teaching labs."]),
            F("use", lambda r: {"us": r.choice(["as a catalyst in plastics manufacturing", "in water treatment",
                                                "as a pigment in ceramics", "in rechargeable batteries",
                                                "as a food preservative", "in fireworks for its bright colour",
                                                "to etch glass", "as a fertiliser additive"])},
              ["What is {n} used for?", "What are the industrial uses of {n}?", "Where is {n} used?"],
              ["{N} is mainly used {us}.", "Industry uses {n} {us}.", "The main application of {n} is {us}."],
              ["{N} has several niche applications in research.",
               "Demand for {n} has grown in recent years."]),
            F("molar_mass", lambda r: {"mm": f"{r.uniform(40, 480):.2f}"},
              ["What is the molar mass of {n}?", "How much does one mole of {n} weigh?",
               "What is the molecular weight of {n}?"],
              ["The molar mass of {n} is {mm} g/mol.", "One mole of {n} weighs {mm} grams.",
               "{N} has a molecular weight of {mm} g/mol."],
              ["The molar mass of {n} is needed for most calculations involving it.",
               "Students often calculate the molar mass of {n} as an exercise."]),
            F("hazard", lambda r: {"hz": r.choice(["toxic if swallowed", "a strong irritant to the eyes and skin",
                                                   "highly flammable", "an oxidiser that can feed fires",
                                                   "corrosive to metals", "harmful to aquatic life",
                                                   "relatively harmless in small amounts"])},
              ["Is {n} dangerous?", "What are the hazards of {n}?", "How should {n} be handled safely?"],
              ["{N} is {hz}.", "Safety data sheets classify {n} as {hz}.",
               "Handle {n} with care: it is {hz}."],
              ["Always read the safety data sheet before working with {n}.",
               "{N} should be stored in a labelled container."]),
        ],
        ["It was first prepared in the nineteenth century.", "Samples are stored in sealed glass bottles.",
         "It is sold in several grades of purity.", "Its crystal structure was solved by X-ray diffraction."]))

    # ----------------------------------------------------------------- history
    male = (["King", "Emperor", "Grand Duke"],
            ["Aldric", "Berengar", "Casimir", "Edmund", "Osric", "Leofric", "Alaric", "Godfrey"])
    female = (["Queen", "Empress", "Grand Duchess"],
              ["Matilda", "Ysolde", "Rowena", "Isolde", "Theodora", "Sigrid", "Adela", "Ermina"])

    def ruler(r):
        titles, names = r.choice([male, female])
        return f"{r.choice(titles)} {r.choice(names)}"
    romans = ["I", "II", "III", "IV", "V", "VI"]
    realms = ["Varnholt", "Estmark", "Quellin", "Dravonia", "Sollund", "Carvel", "Mereth", "Ostrel"]
    houses = ["Ardane", "Bellmoor", "Corvane", "Dunhallow", "Everell", "Faircrest", "Greywater", "Hollins"]
    reforms = ["introduced the first written law code", "reformed the coinage", "founded a university",
               "abolished serfdom", "built a network of roads", "standardised weights and measures",
               "created a royal postal service"]

    def reign(r):
        y1 = r.randint(880, 1650)
        k = r.randint(3, 45)
        return {"y1": y1, "y2": y1 + k, "k": k}

    T.append(Topic("history", "en",
        lambda r: f"{ruler(r)} {r.choice(romans)} of {r.choice(realms)}",
        [
            F("reign", reign,
              ["When did {n} reign?", "How long did {n} rule?", "What were the years of the reign of {n}?"],
              ["{N} reigned from {y1} to {y2}.", "The reign of {n} lasted from {y1} until {y2}.",
               "{N} ruled for {k} years, between {y1} and {y2}."],
              ["The exact dates of the reign of {n} are disputed by historians.",
               "{N} came to the throne during a troubled period."]),
            F("capital", lambda r: {"c": en_town(r)},
              ["What was the capital under {n}?", "Where did {n} hold court?",
               "Which city did {n} rule from?"],
              ["{N} ruled from the city of {c}.", "Under {n}, the royal court sat in {c}.",
               "{c} served as the capital during the reign of {n}."],
              ["{N} moved the court several times during the reign.",
               "The palace of {n} no longer survives."]),
            F("battle", lambda r: {"b": en_town(r), "y": r.randint(880, 1690)},
              ["What battle is {n} known for?", "Which battle did {n} fight?", "Did {n} win any battles?"],
              ["{N} won a decisive victory at the Battle of {b} in {y}.",
               "The Battle of {b}, fought in {y}, made the name of {n}.",
               "In {y}, {n} led an army to victory at {b}."],
              ["{N} fought several campaigns, with mixed results.",
               "Chroniclers exaggerated the military record of {n}."]),
            F("reform", lambda r: {"rf": r.choice(reforms)},
              ["What reforms did {n} introduce?", "What is {n} remembered for?",
               "What did {n} change in the kingdom?"],
              ["{N} {rf}, a reform still remembered today.",
               "Historians credit {n}, who {rf}, with modernising the realm.",
               "During the reign of {n}, the crown {rf}."],
              ["The reforms of {n} were opposed by powerful nobles.",
               "Not all historians agree that {n} was a reformer."]),
            F("successor", lambda r: {"su": f"{ruler(r)} {r.choice(romans)}"},
              ["Who succeeded {n}?", "Who ruled after {n}?", "Who was the heir of {n}?"],
              ["{N} was succeeded by {su}.", "After the death of {n}, the throne passed to {su}.",
               "{su} inherited the crown from {n}."],
              ["The succession after {n} was far from smooth.", "{N} named an heir only late in life."]),
            F("dynasty", lambda r: {"d": r.choice(houses)},
              ["Which dynasty did {n} belong to?", "What royal house was {n} from?",
               "Who were the ancestors of {n}?"],
              ["{N} was a member of the House of {d}.", "{N} came from the {d} dynasty.",
               "The House of {d} produced {n}."],
              ["The family background of {n} has been the subject of much research.",
               "{N} married into a rival royal family."]),
        ],
        ["Contemporary chronicles describe the period in detail.",
         "Coins from the reign are found across the region.",
         "A statue stands in the old market square.", "Many legends grew up around the court."]))

    # ----------------------------------------------------------------- technology
    brands = ["Lumora", "Vexa", "Orbit", "Kestra", "Nuvo", "Zenith", "Axion", "Pixa", "Solis", "Tevo"]
    models = ["X5", "Note 8", "Air 3", "Pro 12", "Lite 2", "S9", "Max 4", "Mini 6", "Edge 7", "One 10"]
    T.append(Topic("technology", "en",
        lambda r: f"the {r.choice(brands)} {r.choice(models)} smartphone",
        [
            F("battery", lambda r: {"b": f"{r.choice(range(3000, 6001, 50)):,}", "h": r.randint(8, 30)},
              ["How big is the battery in {n}?", "What is the battery life of {n}?",
               "How long does {n} last on a charge?"],
              ["{N} has a {b} mAh battery that lasts about {h} hours.",
               "With its {b} mAh battery, {n} runs for roughly {h} hours on a charge.",
               "The battery of {n} holds {b} mAh, enough for {h} hours of use."],
              ["Battery life on {n} depends heavily on screen brightness.",
               "Reviewers tested the battery of {n} in several ways."]),
            F("screen", lambda r: {"inch": f"{r.uniform(5.4, 7.0):.1f}",
                                   "ty": r.choice(["OLED", "LCD", "mini-LED", "AMOLED"]),
                                   "hz": r.choice([60, 90, 120, 144])},
              ["How big is the screen on {n}?", "What display does {n} have?",
               "What is the screen size of {n}?"],
              ["{N} has a {inch}-inch {ty} display refreshing at {hz} Hz.",
               "The screen of {n} is a {inch}-inch {ty} panel running at {hz} Hz.",
               "A {inch}-inch {ty} screen with a {hz} Hz refresh rate sits on the front of {n}."],
              ["The display of {n} is bright enough to use outdoors.",
               "Some owners of {n} have reported screen flicker."]),
            F("price", lambda r: {"pr": f"{r.choice(range(149, 1500, 10)):,}"},
              ["How much does {n} cost?", "What is the price of {n}?", "What was the launch price of {n}?"],
              ["{N} launched at a price of ${pr}.", "The starting price of {n} is ${pr}.",
               "You can buy {n} for ${pr}."],
              ["The price of {n} varies by country and storage option.",
               "Retailers often discount {n} a few months after launch."]),
            F("release", lambda r: {"mo": r.choice(MONTHS), "yr": r.randint(2016, 2025)},
              ["When was {n} released?", "What is the release date of {n}?", "When did {n} come out?"],
              ["{N} was released in {mo} {yr}.", "{N} went on sale in {mo} {yr}.",
               "The release of {n} took place in {mo} {yr}."],
              ["The release of {n} was delayed once.",
               "{N} was announced several months before it reached shops."]),
            F("camera", lambda r: (lambda mp: {"mp": mp, "amp": ("an " if mp == 8 else "a ") + str(mp)})(
                r.choice([8, 12, 13, 16, 24, 32, 48, 50, 64, 108, 200])),
              ["How good is the camera on {n}?", "How many megapixels does {n} have?",
               "What camera does {n} use?"],
              ["{N} has {amp}-megapixel main camera.", "The main camera on {n} uses {amp} MP sensor.",
               "Photos from {n} are taken with {amp}-megapixel sensor."],
              ["The camera app on {n} received several updates after launch.",
               "Low-light photos from {n} divide reviewers."]),
            F("weight", lambda r: {"g": r.randint(135, 245)},
              ["How heavy is {n}?", "What does {n} weigh?", "Is {n} light?"],
              ["{N} weighs {g} grams.", "At {g} g, {n} is easy to carry.", "The weight of {n} is {g} grams."],
              ["The weight of {n} depends on which case you use.", "{N} feels solid in the hand."]),
        ],
        ["It supports fast charging.", "Software updates are promised for five years.",
         "It comes in three colours.", "The box includes a charging cable.",
         "The phone is sold unlocked in most markets."]))

    # ----------------------------------------------------------------- literature
    bk_a = ["Glass", "Silent", "Burning", "Winter", "Hidden", "Last", "Broken", "Golden", "Paper",
            "Distant", "Salt", "Iron"]
    bk_b = ["Orchard", "River", "Lighthouse", "Garden", "Letter", "Harbour", "Station", "Mirror",
            "Kingdom", "Bridge", "Clock", "Island"]
    T.append(Topic("literature", "en",
        lambda r: f"The {r.choice(bk_a)} {r.choice(bk_b)}",
        [
            F("author", lambda r: {"p": person(r)},
              ["Who wrote {n}?", "Who is the author of the novel {n}?", "Which writer published {n}?"],
              ["{N} was written by {p}.", "{p} is the author of the novel {n}.",
               "The novel {n} is the work of {p}."],
              ["{N} was published under a pen name at first.", "The author of {n} rarely gives interviews."]),
            F("year", lambda r: {"y": r.randint(1850, 2023)},
              ["When was {n} published?", "What year did {n} come out?", "How old is the novel {n}?"],
              ["{N} was first published in {y}.", "The novel {n} appeared in {y}.",
               "{N} came out in {y} and has never been out of print."],
              ["{N} has been reprinted many times.", "The first edition of {n} is now a collector's item."]),
            F("setting", lambda r: {"st": r.choice(["a fishing village in Norway", "post-war Vienna",
                                                    "a remote Scottish island", "a mining town in Chile",
                                                    "nineteenth-century Lisbon", "a floating city in the future",
                                                    "a boarding school in Wales", "the Australian outback"])},
              ["Where is {n} set?", "What is the setting of {n}?", "In which place does the story of {n} take place?"],
              ["{N} is set in {st}.", "The story of {n} takes place in {st}.",
               "Readers of {n} are taken to {st}, where the whole story unfolds."],
              ["The setting of {n} is described in rich detail.", "{N} moves between several places and periods."]),
            F("protagonist", lambda r: {"pr": r.choice(FIRST_NAMES),
                                        "oc": r.choice(["a lighthouse keeper", "a young doctor",
                                                        "a retired detective", "a travelling musician",
                                                        "a schoolteacher", "a ship's cook", "a clockmaker"])},
              ["Who is the main character of {n}?", "Who is the protagonist in {n}?", "What is {n} about?"],
              ["The main character of {n} is {pr}, {oc}.", "{N} follows {pr}, {oc}.",
               "At the heart of {n} is {pr}, {oc}."],
              ["{N} has a large cast of characters.", "The narrator of {n} is not always reliable."]),
            F("genre", lambda r: {"ge": r.choice(["historical fiction", "science fiction", "magical realism",
                                                  "crime fiction", "literary fiction", "gothic fiction",
                                                  "adventure fiction", "comic fiction"])},
              ["What genre is {n}?", "What kind of book is {n}?", "Is {n} a thriller?"],
              ["{N} is a work of {ge}.", "Booksellers shelve {n} under {ge}.",
               "Critics describe {n} as {ge} at its best."],
              ["{N} mixes several genres, which makes it hard to classify.",
               "Readers expecting a simple story from {n} are often surprised."]),
            F("length", lambda r: {"pg": r.randint(120, 900)},
              ["How long is {n}?", "How many pages does {n} have?", "Is {n} a long book?"],
              ["{N} runs to {pg} pages.", "The novel {n} is {pg} pages long.",
               "In its first edition, {n} has {pg} pages."],
              ["The length of {n} puts some readers off.",
               "{N} was heavily cut by its editor before publication."]),
        ],
        ["It has been translated into many languages.", "A film adaptation is in development.",
         "It won a national book prize.", "Book clubs often choose it for discussion."]))
    return T


def topics_zh() -> list[Topic]:
    T: list[Topic] = []

    # ----------------------------------------------------------------- 烹饪 (cooking)
    z_adj = ["香辣", "红烧", "清蒸", "糖醋", "麻辣", "蒜香", "葱油", "酱爆", "黑椒", "椒盐", "干锅", "酸汤"]
    z_ing = ["豆腐", "鸡翅", "排骨", "茄子", "鲈鱼", "牛腩", "土豆", "虾仁", "莲藕", "冬瓜", "羊肉", "香菇"]
    T.append(Topic("cooking", "zh",
        lambda r: r.choice(z_adj) + r.choice(z_ing),
        [
            F("cook_time", lambda r: {"m": r.choice(range(15, 125, 5))},
              ["{n}需要做多长时间？", "做{n}大概要多少分钟？", "{n}的烹饪时间是多少？"],
              ["{n}大约需要烹饪{m}分钟。", "做一道{n}前后要花{m}分钟左右。", "{n}从下锅到出锅约需{m}分钟。"],
              ["{n}的烹饪时间要看火候和食材大小。", "关于{n}要煮多久，各家说法不一。"]),
            F("seasoning", lambda r: {"sp": r.choice(["八角", "花椒", "豆瓣酱", "生抽", "陈醋", "桂皮",
                                                      "孜然", "蚝油", "黄酒", "白胡椒"])},
              ["{n}主要用什么调料？", "做{n}要放什么香料？", "{n}的味道来自哪种调料？"],
              ["{n}的独特风味主要来自{sp}。", "做{n}时要放足{sp}。", "{n}以{sp}为主要调味料。"],
              ["{n}的调味各家都有自己的秘方。", "{n}的调料一般在出锅前加入，以保持香味。"]),
            F("origin", lambda r: {"rg": r.choice(["湘西", "川北", "粤东", "闽南", "江南", "鲁中", "滇西",
                                                   "黔东", "皖南", "赣北"]) + r.choice(["山区", "水乡", "渔村", "小城"])},
              ["{n}是哪里的菜？", "{n}起源于什么地方？", "{n}的发源地在哪里？"],
              ["{n}最早源自{rg}。", "{n}起源于{rg}，至今仍是当地名菜。", "{rg}是{n}的发源地。"],
              ["好几个地方都说{n}是自己发明的。", "{n}究竟源自何处，至今没有定论。"]),
            F("staple", lambda r: {"st": r.choice(["米饭", "馒头", "面条", "烙饼", "白粥", "花卷", "米粉"])},
              ["{n}配什么主食好？", "吃{n}应该搭配什么？", "{n}通常和什么一起吃？"],
              ["{n}通常搭配{st}一起吃。", "{n}配上{st}最为合适。", "吃{n}时，当地人习惯配{st}。"],
              ["{n}搭配什么主食，全看个人口味。", "{n}可以和很多种主食搭配。"]),
            F("servings", lambda r: {"k": r.randint(2, 8)},
              ["一份{n}够几个人吃？", "{n}一次能做几人份？", "{n}的分量有多少？"],
              ["一锅{n}可供{k}人食用。", "按标准做法，{n}一次能做{k}人份。", "{n}一份大约够{k}个人吃。"],
              ["{n}的分量可以根据人数随意增减。", "请客时做{n}，最好多准备一些。"]),
            F("storage", lambda r: {"d": r.randint(2, 5)},
              ["{n}能在冰箱里放几天？", "吃剩的{n}怎么保存？", "{n}可以放多久？"],
              ["吃剩的{n}放进冰箱可保存{d}天。", "{n}密封冷藏后能放{d}天左右。", "{n}在冰箱里最多存放{d}天。"],
              ["剩下的{n}要先放凉再冷藏。", "{n}能放多久取决于烹饪方式和保存条件。"]),
        ],
        ["这道菜很适合家常晚餐。", "很多人逢年过节都会做这道菜。", "隔夜再吃味道更好。", "做法简单，新手也能上手。"]))

    # ----------------------------------------------------------------- 旅行 (travel)
    t_a = ["青", "云", "石", "柳", "白", "松", "月", "桃", "枫", "鹤", "梅", "兰"]
    t_b = ["川", "岭", "湾", "塘", "桥", "坪", "溪", "港", "源", "峰"]
    T.append(Topic("travel", "zh",
        lambda r: r.choice(t_a) + r.choice(t_b) + r.choice(["镇", "古镇"]),
        [
            F("best_time", lambda r: (lambda i, k: {"m1": i, "m2": i + k})(r.randint(1, 9), r.randint(1, 3)),
              ["什么时候去{n}旅游最好？", "{n}最佳旅游季节是什么时候？", "几月份适合去{n}？"],
              ["去{n}旅游的最佳时间是{m1}月到{m2}月。", "每年{m1}月至{m2}月是{n}最美的季节。",
               "{m1}月到{m2}月间游览{n}，天气最宜人。"],
              ["{n}一年四季都可以去，但各有不足。", "旺季时{n}的住宿价格会大幅上涨。"]),
            F("getting_there", lambda r: {"hub": r.choice(["杭州", "成都", "昆明", "西安", "广州", "南京",
                                                           "长沙", "福州"]),
                                          "tr": r.choice(["高铁", "大巴", "轮渡", "长途汽车"]),
                                          "h": r.randint(1, 9)},
              ["怎么去{n}？", "到{n}要多长时间？", "去{n}坐什么交通工具方便？"],
              ["从{hub}乘{tr}约{h}小时可到{n}。", "去{n}最方便的方式是从{hub}坐{tr}，路程约{h}小时。",
               "从{hub}出发，坐{tr}大约{h}个小时就能到达{n}。"],
              ["去{n}的路上风景也很不错。", "冬季前往{n}的交通班次会减少。"]),
            F("attraction", lambda r: {"at": r.choice(["山顶的古塔", "千年石拱桥", "临水的老街", "明代古寺",
                                                       "溶洞群", "万亩花田", "百年茶园", "古城墙"])},
              ["{n}有什么好玩的景点？", "去{n}必看什么？", "{n}以什么出名？"],
              ["{n}最有名的景点是{at}。", "大多数游客来{n}是为了看{at}。", "{at}是{n}的标志性景点。"],
              ["{n}景点不少，但冬季开放时间较短。", "关于{n}先去哪里玩，攻略说法各不相同。"]),
            F("food", lambda r: {"fo": r.choice(["酸汤鱼", "米粉", "桂花糕", "竹筒饭", "腊肉", "豆腐花",
                                                 "烤乳扇", "糍粑"])},
              ["{n}有什么特色小吃？", "去{n}应该吃什么？", "{n}的美食有哪些？"],
              ["{n}的特色小吃是{fo}。", "到了{n}一定要尝尝{fo}。", "{n}几乎每家饭馆都有{fo}。"],
              ["{n}的饭馆菜单会随季节变化。", "{n}有热闹的早市，但收摊很早。"]),
            F("festival", lambda r: {"fe": r.choice(["灯会", "龙舟节", "花朝节", "庙会", "火把节", "丰收节"]),
                                     "mo": r.randint(1, 12)},
              ["{n}有什么节庆活动？", "{n}的传统节日在几月？", "{n}每年有哪些活动？"],
              ["{n}每年{mo}月都会举办{fe}。", "每逢{mo}月，{n}就会迎来热闹的{fe}。",
               "{fe}是{n}每年{mo}月最重要的活动。"],
              ["{n}有不少民俗活动，但日期每年不同。", "节庆期间{n}的客栈很快就会订满。"]),
            F("stay", lambda r: {"sa": r.choice(["老街上的民宿", "湖边的客栈", "山脚下的农家乐",
                                                 "古宅改建的精品酒店", "镇口的青年旅舍"])},
              ["去{n}住哪里好？", "{n}有哪些住宿选择？", "{n}有酒店吗？"],
              ["大多数游客在{n}选择住{sa}。", "{n}最好的住处是{sa}。", "在{n}过夜，推荐{sa}。"],
              ["去{n}住宿最好提前预订。", "{n}的房价全年波动很大。"]),
        ],
        ["古镇不大，步行即可逛完。", "这里的傍晚格外热闹。", "周边很适合徒步。", "镇上的居民热情好客。"]))

    # ----------------------------------------------------------------- 足球 (football)
    f_city = ["江宁", "海城", "北川", "南屿", "东岳", "西陵", "临江", "安平", "新港", "清河", "龙泉", "嘉禾"]
    f_team = ["猛虎", "雄鹰", "蓝鲸", "飞龙", "烈马", "海狮", "金狮", "火凤", "银狼", "黑豹"]
    zh_col = ["红", "蓝", "白", "黑", "黄", "绿", "橙", "紫"]
    T.append(Topic("football", "zh",
        lambda r: r.choice(f_city) + r.choice(f_team) + "队",
        [
            F("stadium", lambda r: {"st": r.choice(["奥林", "滨江", "新城", "东湖", "市民", "人民", "南山",
                                                    "北湖"]) + r.choice(["体育场", "体育中心", "足球场"]),
                                    "cap": r.randint(8, 60) * 1000},
              ["{n}的主场在哪里？", "{n}的主球场叫什么？", "{n}的主场能容纳多少人？"],
              ["{n}的主场是{st}，可容纳{cap}名观众。", "{n}在{st}进行主场比赛，球场共有{cap}个座位。",
               "{st}是{n}的主场，容量为{cap}人。"],
              ["{n}多年来一直计划搬入新球场。", "{n}的主场自建队以来已经多次翻修。"]),
            F("founded", lambda r: {"y": r.randint(1950, 2015),
                                    "wp": r.choice(["钢铁厂", "纺织厂", "港务局", "铁路局", "煤矿"])},
              ["{n}是哪一年成立的？", "{n}有多少年历史了？", "{n}的建队时间是什么时候？"],
              ["{n}成立于{y}年，前身是{wp}职工队。", "{n}始建于{y}年，由当地{wp}的职工组建。",
               "{y}年，当地{wp}的职工组建了{n}。"],
              ["{n}是当地历史最悠久的球队之一，但早期档案并不完整。", "每年{n}都会举行纪念建队的比赛。"]),
            F("coach", lambda r: {"p": zh_person(r), "y": r.randint(2012, 2024)},
              ["{n}的主教练是谁？", "现在谁在执教{n}？", "{n}的主帅是谁？"],
              ["{n}的主教练是{p}，他于{y}年上任。", "{p}自{y}年起担任{n}主帅。", "从{y}年开始，{n}由{p}执教。"],
              ["{n}近几个赛季频繁更换主教练。", "据报道，{n}俱乐部正在评估教练组。"]),
            F("colours", lambda r: dict(zip(("c1", "c2"), r.sample(zh_col, 2))),
              ["{n}的球衣是什么颜色？", "{n}主场穿什么颜色的队服？", "{n}的队服配色是怎样的？"],
              ["{n}身穿{c1}色球衣、{c2}色短裤。", "{n}的主场队服为{c1}{c2}相间。", "{n}主场比赛时穿{c1}色和{c2}色。"],
              ["{n}每个赛季都会更换球衣设计。", "{n}的客场球衣每年夏天发布。"]),
            F("scorer", lambda r: {"p": zh_person(r), "g": r.randint(60, 260)},
              ["{n}的队史射手王是谁？", "谁为{n}进球最多？", "{n}的进球纪录是多少？"],
              ["{n}队史头号射手是{p}，共打进{g}球。", "{p}为{n}攻入{g}球，是队史进球最多的球员。",
               "至今无人打破{p}为{n}创下的{g}球纪录。"],
              ["{n}历史上涌现过许多高效的前锋。", "{n}的进球纪录已经保持了很多年。"]),
            F("titles", lambda r: {"k": r.randint(1, 12)},
              ["{n}拿过几次联赛冠军？", "{n}获得过多少个冠军？", "{n}的最好成绩是什么？"],
              ["{n}共获得过{k}次联赛冠军。", "{n}曾{k}次夺得联赛冠军。", "在队史上，{n}一共捧起过{k}座联赛冠军奖杯。"],
              ["{n}多次接近冠军，却屡屡功亏一篑。", "{n}的荣誉室里陈列着不少奖杯。"]),
        ],
        ["俱乐部还设有青训梯队。", "球迷经常大批前往客场助威。", "德比战总能吸引最多观众。", "球队两个赛季前刚刚升级。"]))

    # ----------------------------------------------------------------- 医药 (medicine)
    m_a = ["安", "康", "舒", "宁", "复", "益", "清", "维", "泰", "欣", "怡", "瑞"]
    m_b = ["必", "乐", "达", "平", "尔", "迪", "妥", "克", "素", "洛"]
    T.append(Topic("medicine", "zh",
        lambda r: r.choice(m_a) + r.choice(m_b) + r.choice(["片", "胶囊", "颗粒"]),
        [
            F("treats", lambda r: {"c": r.choice(["高血压", "偏头痛", "过敏性鼻炎", "胃酸反流", "哮喘",
                                                  "2型糖尿病", "失眠", "关节炎", "湿疹", "痛风"])},
              ["{n}是治什么病的？", "{n}主要用于哪些疾病？", "医生为什么会开{n}？"],
              ["{n}用于治疗{c}。", "医生常用{n}来治疗{c}。", "{n}是一种治疗{c}的药物。"],
              ["{n}必须在医生指导下使用。", "{n}在不同国家批准的适应症有所不同。"]),
            F("dose", lambda r: {"mg": r.choice([5, 10, 20, 25, 50, 100, 200, 250, 500]),
                                 "fr": r.choice(["每日一次", "每日两次", "每日三次", "每八小时一次"])},
              ["{n}一次吃多少？", "{n}的常用剂量是多少？", "{n}一天吃几次？"],
              ["{n}成人常用量为每次{mg}毫克，{fr}。", "成年人服用{n}，一般每次{mg}毫克，{fr}。",
               "{n}的标准用法是{fr}，每次{mg}毫克。"],
              ["{n}的剂量需由医生根据个人情况调整。", "未经医生同意，不要自行改变{n}的用量。"]),
            F("side_effect", lambda r: {"se": r.choice(["头痛", "嗜睡", "口干", "恶心", "头晕", "轻微胃部不适",
                                                        "皮疹", "肌肉酸痛", "失眠"])},
              ["{n}有什么副作用？", "吃{n}会有不良反应吗？", "{n}最常见的副作用是什么？"],
              ["{n}最常见的副作用是{se}。", "部分患者服用{n}后会出现{se}。", "{n}可能引起{se}，用药初期尤为明显。"],
              ["和所有药物一样，{n}也可能有副作用。", "服用{n}期间如有不适，请及时告知医生。"]),
            F("drug_class", lambda r: {"cl": r.choice(["β受体阻滞剂", "抗组胺药", "质子泵抑制剂", "糖皮质激素",
                                                       "他汀类药物", "非甾体抗炎药", "钙通道阻滞剂", "双胍类药物"])},
              ["{n}属于哪一类药？", "{n}是什么类型的药物？", "{n}的作用机制是什么？"],
              ["{n}属于{cl}。", "从药理上看，{n}是一种{cl}。", "{n}被归类为{cl}。"],
              ["{n}的作用方式与许多老药不同。", "{n}在体内的作用机制仍在研究中。"]),
            F("how_to_take", lambda r: {"tk": r.choice(["饭后", "空腹", "睡前", "早餐前", "随餐"])},
              ["{n}应该饭前吃还是饭后吃？", "什么时候吃{n}最好？", "{n}怎么服用？"],
              ["{n}应{tk}服用。", "为了更好地吸收，{n}宜{tk}服用。", "医生建议患者{tk}服用{n}。"],
              ["{n}的服用时间会影响药效。", "{n}的说明书中写明了服药时间。"]),
            F("interaction", lambda r: {"ix": r.choice(["酒精", "西柚汁", "抗酸药", "抗凝血药", "其他镇静药",
                                                        "钾补充剂", "布洛芬"])},
              ["吃{n}期间要避免什么？", "{n}会和其他药物相互作用吗？", "吃{n}能喝酒吗？"],
              ["服用{n}期间应避免{ix}。", "{n}不宜与{ix}同时使用。", "{n}与{ix}合用可能产生有害的相互作用。"],
              ["{n}会与部分药物相互作用，请告诉药师您正在服用的药。", "{n}的药物相互作用列在说明书中。"]),
        ],
        ["该药须凭处方购买。", "目前已有仿制药上市。", "药师可以解答用药问题。", "请将药品存放在儿童接触不到的地方。"]))

    # ----------------------------------------------------------------- 天气 (weather)
    w_a = ["岚", "澄", "苍", "霁", "漪", "翠", "琅", "沅", "峪", "檀"]
    w_b = ["阳", "州", "原", "水", "川", "丰", "泽", "宁"]
    zh_dirs = ["东北", "西北", "东南", "西南", "北", "南", "东", "西"]
    T.append(Topic("weather", "zh",
        lambda r: r.choice(w_a) + r.choice(w_b) + "市",
        [
            F("warmest", lambda r: {"mo": r.randint(6, 8), "t": r.randint(22, 38)},
              ["{n}最热的月份是几月？", "{n}夏天有多热？", "{n}夏季平均气温是多少？"],
              ["{n}最热的月份是{mo}月，平均最高气温{t}℃。", "{n}的气温在{mo}月达到顶峰，约为{t}摄氏度。",
               "{mo}月是{n}一年中最热的时候，白天平均气温{t}℃左右。"],
              ["{n}的夏季气温年际变化很大。", "{n}偶尔会出现高温天气，但通常持续不久。"]),
            F("rainfall", lambda r: {"mm": r.choice(range(300, 2550, 10))},
              ["{n}的年降水量是多少？", "{n}雨水多吗？", "{n}一年下多少雨？"],
              ["{n}年均降水量约为{mm}毫米。", "{n}每年的降雨量大约{mm}毫米。", "{n}一年的降水总量在{mm}毫米左右。"],
              ["近几十年来，{n}的降水越来越难以预测。", "{n}的雨量站已有上百年的观测记录。"]),
            F("rainy_season", lambda r: (lambda i, k: {"m1": i, "m2": i + k})(r.randint(3, 8), r.randint(1, 3)),
              ["{n}的雨季是什么时候？", "{n}哪个月雨最多？", "去{n}应该避开哪几个月的雨季？"],
              ["{n}的雨季集中在{m1}月到{m2}月。", "{n}降雨最多的时段是{m1}月至{m2}月。",
               "每年{m1}月到{m2}月，{n}进入雨季。"],
              ["{n}一年四季都可能下阵雨。", "{n}的居民无论几月出门都习惯带伞。"]),
            F("snow", lambda r: {"k": r.randint(0, 60)},
              ["{n}会下雪吗？", "{n}一年有几天下雪？", "{n}冬天下雪多吗？"],
              ["{n}平均每年有{k}天降雪。", "{n}每年大约有{k}个下雪天。", "每到冬季，{n}约有{k}天会下雪。"],
              ["{n}的积雪通常很快融化。", "{n}冬天很冷，但降雪预报常常不准。"]),
            F("wind", lambda r: {"d": r.choice(zh_dirs)},
              ["{n}常年刮什么风？", "{n}的盛行风向是什么？", "{n}风大吗？"],
              ["{n}的盛行风为{d}风。", "{n}一年中大多吹{d}风。", "{n}常年受{d}风影响。"],
              ["暴风雨经过时，{n}的风向变化很快。", "{n}的气象站每分钟测量一次风速。"]),
            F("sunshine", lambda r: {"h": r.choice(range(1000, 3250, 10))},
              ["{n}日照充足吗？", "{n}一年有多少小时日照？", "{n}的阳光多不多？"],
              ["{n}年日照时数约为{h}小时。", "{n}平均每年有{h}小时的日照。", "{n}全年日照总量在{h}小时左右。"],
              ["{n}的早晨常被低云遮挡阳光。", "照片里的{n}看上去比实际更晴朗。"]),
        ],
        ["当地气候总体温和。", "城市坐落在一个避风的山谷中。", "当地的气象记录可追溯到1900年。",
         "附近的山脉对当地天气影响很大。"]))
    return T


# ---------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------
@dataclass
class Fact:
    block: str  # "<label>/<lang>"
    label: str
    lang: str
    entity: str
    facet: str
    split: str
    statements: list[str]
    queries: list[str]
    partials: list[str]
    passage: str = ""  # canonical passage (a statement, sometimes plus an extra sentence)


def join_sent(lang: str, a: str, b: str) -> str:
    return a + b if lang == "zh" else a + " " + b


def render(tpl: str, name: str, vals: dict) -> str:
    return tpl.format(n=name, N=cap(name), **vals)


def build_facts() -> list[Fact]:
    facts: list[Fact] = []
    for topic in topics_en() + topics_zh():
        block = f"{topic.label}/{topic.lang}"
        rng = random.Random(f"{SEED}:{block}")
        names: list[str] = []
        while len(names) < N_ENTITIES:
            nm = topic.name(rng)
            if nm not in names:
                names.append(nm)
        for i, name in enumerate(names):
            split = "heldout" if i >= N_ENTITIES - N_HELDOUT_ENTITIES else "train"
            for facet in topic.facets:
                vals = facet.val(rng)
                f = Fact(block, topic.label, topic.lang, name, facet.key, split,
                         [render(t, name, vals) for t in facet.s],
                         [render(t, name, vals) for t in facet.q],
                         [render(t, name, vals) for t in facet.p])
                base = rng.choice(f.statements)
                f.passage = join_sent(topic.lang, base, rng.choice(topic.extras)) if rng.random() < 0.2 else base
                f.partials = [join_sent(topic.lang, p, rng.choice(topic.extras)) if rng.random() < 0.15 else p
                              for p in f.partials]
                facts.append(f)
    return facts


# ---------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------
def build_retrieval(facts: list[Fact], split: str, rng: random.Random, limit: int | None = None) -> list[dict]:
    sf = [f for f in facts if f.split == split]
    by_block_facet: dict[tuple, list[Fact]] = {}
    by_block_entity: dict[tuple, list[Fact]] = {}
    for f in sf:
        by_block_facet.setdefault((f.block, f.facet), []).append(f)
        by_block_entity.setdefault((f.block, f.entity), []).append(f)
    records = []
    for f in sf:
        same_ent = [g for g in by_block_entity[(f.block, f.entity)] if g is not f]
        same_fac = [g for g in by_block_facet[(f.block, f.facet)] if g is not f]
        e1, f1 = rng.sample(same_ent, 2), rng.sample(same_fac, 2)
        negs = [e1[0].passage, f1[0].passage, rng.choice(f.partials),
                (e1[1] if rng.random() < 0.5 else f1[1]).passage]
        rng.shuffle(negs)
        assert f.passage not in negs and len(set(negs)) == 4
        records.append({"query": rng.choice(f.queries), "pos": [f.passage], "neg": negs,
                        "instruction": INSTRUCTION})
    rng.shuffle(records)
    return records[:limit] if limit else records


# ---------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------
EN_SYN = {
    "about": "approximately", "roughly": "approximately", "mainly": "chiefly",
    "usually": "typically", "typically": "usually", "normally": "usually",
    "needs": "requires", "requires": "needs", "main": "principal", "often": "frequently",
    "every": "each", "each": "every", "best known": "most famous", "most common": "most frequent",
    "visitors": "tourists", "travellers": "visitors", "created": "written", "people": "diners",
    "fans": "supporters", "receives": "gets", "enjoys": "gets", "weighs": "has a weight of",
    "launched": "debuted", "went on sale": "became available", "published": "released",
    "novel": "book", "prescribed": "given", "thrives": "does best", "famous": "celebrated",
}
ZH_SYN = {
    "大约": "约莫", "约": "大概", "通常": "一般", "一般": "通常", "主要": "大多", "最有名": "最著名",
    "可以": "能够", "需要": "要", "常用": "常见", "每年": "每一年", "球迷": "拥趸", "游客": "旅客",
    "大多数": "多数", "医生": "大夫", "患者": "病人", "最好": "最佳",
}


def _syn_regex(d: dict, lang: str) -> re.Pattern:
    keys = sorted(d, key=len, reverse=True)
    alt = "|".join(re.escape(k) for k in keys)
    return re.compile(rf"\b({alt})\b" if lang == "en" else f"({alt})", re.IGNORECASE if lang == "en" else 0)


SYN_RE = {"en": _syn_regex(EN_SYN, "en"), "zh": _syn_regex(ZH_SYN, "zh")}


def synonym_swap(text: str, lang: str, rng: random.Random, p: float = 0.7) -> str:
    table = EN_SYN if lang == "en" else ZH_SYN

    def sub(m: re.Match) -> str:
        w = m.group(0)
        if rng.random() >= p:
            return w
        rep = table[w.lower()] if lang == "en" else table[w]
        return cap(rep) if w[:1].isupper() else rep

    return SYN_RE[lang].sub(sub, text)


def build_sts(facts: list[Fact], split: str, n: int, rng: random.Random) -> list[dict]:
    sf = [f for f in facts if f.split == split]
    by_block: dict[str, list[Fact]] = {}
    by_ent: dict[tuple, list[Fact]] = {}
    by_fac: dict[tuple, list[Fact]] = {}
    extras = {t.label + "/" + t.lang: t.extras for t in topics_en() + topics_zh()}
    for f in sf:
        by_block.setdefault(f.block, []).append(f)
        by_ent.setdefault((f.block, f.entity), []).append(f)
        by_fac.setdefault((f.block, f.facet), []).append(f)
    blocks_by_lang = {lang: sorted({f.block for f in sf if f.lang == lang}) for lang in ("en", "zh")}

    def jitter(center: float, half: float) -> float:
        return round(min(5.0, max(0.0, center + rng.uniform(-half, half))), 2)

    # (kind, cumulative probability)
    kinds = [("para", 0.30), ("swap", 0.38), ("para_extra", 0.48), ("same_entity", 0.63),
             ("same_facet", 0.77), ("same_topic", 0.87), ("diff_topic", 1.0)]
    out, seen = [], set()
    while len(out) < n:
        f = rng.choice(sf)
        u = rng.random()
        kind = next(k for k, c in kinds if u < c)
        if kind == "para":
            i, j = rng.sample(range(len(f.statements)), 2)
            t1, t2 = f.statements[i], synonym_swap(f.statements[j], f.lang, rng, 0.3)
            score = jitter(4.6, 0.4)
        elif kind == "swap":
            i = rng.randrange(len(f.statements))
            t1, t2 = f.statements[i], synonym_swap(f.statements[i], f.lang, rng)
            if t1 == t2:
                continue
            score = jitter(4.75, 0.25)
        elif kind == "para_extra":
            i, j = rng.sample(range(len(f.statements)), 2)
            t1 = f.statements[i]
            t2 = join_sent(f.lang, f.statements[j], rng.choice(extras[f.block]))
            score = jitter(3.9, 0.3)
        elif kind == "same_entity":
            g = rng.choice([x for x in by_ent[(f.block, f.entity)] if x is not f])
            t1, t2 = rng.choice(f.statements), rng.choice(g.statements)
            score = jitter(2.9, 0.35)
        elif kind == "same_facet":
            g = rng.choice([x for x in by_fac[(f.block, f.facet)] if x is not f])
            t1, t2 = rng.choice(f.statements), rng.choice(g.statements)
            score = jitter(1.9, 0.3)
        elif kind == "same_topic":
            g = rng.choice([x for x in by_block[f.block] if x.entity != f.entity and x.facet != f.facet])
            t1, t2 = rng.choice(f.statements), rng.choice(g.statements)
            score = jitter(1.3, 0.3)
        else:
            other = rng.choice([b for b in blocks_by_lang[f.lang] if b.split("/")[0] != f.label])
            g = rng.choice(by_block[other])
            t1, t2 = rng.choice(f.statements), rng.choice(g.statements)
            score = jitter(0.25, 0.25)
        if t1 == t2:
            continue
        if rng.random() < 0.5:
            t1, t2 = t2, t1
        key = (min(t1, t2), max(t1, t2))
        if key in seen:
            continue
        seen.add(key)
        out.append({"text1": t1, "text2": t2, "score": score})
    return out


# ---------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------
def build_classification(facts: list[Fact], split: str, n: int, rng: random.Random) -> list[dict]:
    sf = [f for f in facts if f.split == split]
    labels = sorted({f.label for f in sf})
    per_label = {lab: [f for f in sf if f.label == lab] for lab in labels}
    out, seen = [], set()
    quota = [n // len(labels) + (1 if i < n % len(labels) else 0) for i in range(len(labels))]
    for lab, q in zip(labels, quota):
        pool = per_label[lab]
        got = 0
        while got < q:
            f = rng.choice(pool)
            u = rng.random()
            src = f.statements if u < 0.6 else (f.queries if u < 0.85 else f.partials)
            text = rng.choice(src)
            if text in seen:
                continue
            seen.add(text)
            out.append({"text": text, "label": lab})
            got += 1
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
def record_texts(family: str, rec: dict) -> list[str]:
    if family == "retrieval":
        return [rec["query"], *rec["pos"], *rec["neg"]]
    if family == "sts":
        return [rec["text1"], rec["text2"]]
    return [rec["text"]]


def build_tokenizer(corpus: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok


def tokenizer_config(tok) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


SPECIAL_TOKENS_MAP = {
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


# ---------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------
def readme(counts: dict, facts: list[Fact]) -> str:
    blocks = sorted({f.block for f in facts})
    labels = sorted({f.label for f in facts})
    zh = sorted({f.label for f in facts if f.lang == "zh"})
    c = counts
    return f"""# QZhou-JAX demo dataset

A small, fully **synthetic** multi-task dataset shipped with `qzhou_jax` for the CPU demo
training run and for tests. Every data file in this folder (and the tokenizer in `../tokenizer/`)
is written by [`../build_demo_assets.py`](../build_demo_assets.py) from hand-written templates
and invented entity names (dishes, exoplanets, football clubs, software libraries, bank
accounts, towns, bands, medicines, chemical compounds, rulers, gadgets, novels, ...). The
statements are fictional and must not be taken as facts; no text is copied or derived from an
existing dataset. Regenerate with

    python3 qzhou_jax/assets/build_demo_assets.py [--out DIR]

The generator is deterministic (fixed seed): re-running it reproduces these files byte for byte.

License: Apache-2.0, the same as the project.

## Topics

{len(labels)} topic labels: {", ".join(f"`{x}`" for x in labels)}.
English covers all of them; a Chinese part covers {", ".join(f"`{x}`" for x in zh)}
(Chinese texts carry the same English topic labels). There are {len(blocks)} topic blocks
(topic x language), each with {N_ENTITIES} entities and 6 facets per entity (one fact per
entity-facet pair). Per block, {N_ENTITIES - N_HELDOUT_ENTITIES} entities go to *train* and
{N_HELDOUT_ENTITIES} to *heldout*, so the splits share no entity and no text.

## Files

All files are UTF-8 JSONL, one JSON object per line.

| file | records | fields |
|---|---|---|
| `retrieval_train.jsonl` | {c['retrieval_train']} | `query: str`, `pos: [str]` (1), `neg: [str]` (4), `instruction: str` |
| `retrieval_heldout.jsonl` | {c['retrieval_heldout']} | same |
| `sts_train.jsonl` | {c['sts_train']} | `text1: str`, `text2: str`, `score: float` in [0, 5] |
| `sts_heldout.jsonl` | {c['sts_heldout']} | same |
| `classification_train.jsonl` | {c['classification_train']} | `text: str`, `label: str` (topic name) |
| `classification_heldout.jsonl` | {c['classification_heldout']} | same |

Written by hand: `demo.yaml` (the run `qzhou-jax demo` trains; `configs/demo.yaml` links to it)
and `tasks.yaml` (the held-out evaluation tasks the demo scores before and after training).

### Retrieval

One record per fact (heldout: {c['retrieval_heldout']} of its {sum(f.split == 'heldout' for f in facts)} facts, chosen at random).
`query` is a question about one facet of one entity (e.g. the stadium of a football club). `pos` is the fact's passage: 1-2 sentences that answer it, sharing the entity
name but phrased differently. `neg` holds four hard negatives from the same topic block and
split: a passage about the same entity but another facet, a passage about the same facet of
another entity, an incomplete answer (mentions the entity and the facet but gives no answer),
and one more same-entity or same-facet passage. Each fact has one passage, so passages repeat
across records as positives/negatives, which also makes the heldout file usable as a small
retrieval corpus. `instruction` is always `"{INSTRUCTION}"`.

### STS

Sentence pairs from the fact statements, with scores assigned by construction plus small
deterministic jitter:

| pair | score |
|---|---|
| same fact, different template and/or synonym swaps | 4.2 - 5.0 |
| same fact, one side with an extra unrelated sentence | 3.6 - 4.2 |
| same entity, different facet | 2.55 - 3.25 |
| same topic and facet, different entity | 1.6 - 2.2 |
| same topic, different entity and facet | 1.0 - 1.6 |
| different topics (same language) | 0.0 - 0.5 |

### Classification

Statements, questions and incomplete answers labelled with their topic, balanced over the
{len(labels)} labels.

## Tokenizer

`../tokenizer/` holds a byte-level BPE tokenizer (Qwen2-style pre-tokenisation, NFC) trained on
the train-split texts of this dataset (plus the train queries wrapped in QZhou's
`Instruct: ...\\nQuery: ...` prompt), {VOCAB_SIZE} tokens including the special tokens
`<|endoftext|>` (id 0; pad and eos), `<|im_start|>` (1) and `<|im_end|>` (2). It loads offline
with `transformers.AutoTokenizer.from_pretrained("qzhou_jax/assets/tokenizer")`.
"""


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def dump_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


def dump_json(path: pathlib.Path, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def check_disjoint(data: dict) -> None:
    fams = ("retrieval", "sts", "classification")
    train = {t for fam in fams for r in data[f"{fam}_train"] for t in record_texts(fam, r)}
    held = {t for fam in fams for r in data[f"{fam}_heldout"] for t in record_texts(fam, r)}
    both = train & held
    if both:
        raise AssertionError(f"{len(both)} texts shared between train and heldout, e.g. {sorted(both)[:3]}")


def main(out_dir: str | pathlib.Path | None = None) -> dict:
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(__file__).resolve().parent
    demo, tokdir = out / "demo", out / "tokenizer"
    demo.mkdir(parents=True, exist_ok=True)
    tokdir.mkdir(parents=True, exist_ok=True)

    facts = build_facts()
    data = {}
    for split in ("train", "heldout"):
        data[f"retrieval_{split}"] = build_retrieval(facts, split, random.Random(f"{SEED}:retrieval:{split}"),
                                                    RETRIEVAL_LIMIT[split])
        data[f"sts_{split}"] = build_sts(facts, split, STS_COUNTS[split], random.Random(f"{SEED}:sts:{split}"))
        data[f"classification_{split}"] = build_classification(
            facts, split, CLS_COUNTS[split], random.Random(f"{SEED}:cls:{split}"))
    check_disjoint(data)
    for name, recs in data.items():
        dump_jsonl(demo / f"{name}.jsonl", recs)
    counts = {k: len(v) for k, v in data.items()}
    (demo / "README.md").write_text(readme(counts, facts), encoding="utf-8", newline="\n")

    corpus = {t for fam in ("retrieval", "sts", "classification")
              for r in data[f"{fam}_train"] for t in record_texts(fam, r)}
    # queries are embedded with QZhou's instruction prompt, so the tokenizer sees it too
    corpus |= {PROMPT_TEMPLATE.format(instruction=r["instruction"], text=r["query"])
               for r in data["retrieval_train"]}
    corpus = sorted(corpus)
    tok = build_tokenizer(corpus)
    tok.save(str(tokdir / "tokenizer.json"), pretty=False)
    dump_json(tokdir / "tokenizer_config.json", tokenizer_config(tok))
    dump_json(tokdir / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    return counts


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder (default: the folder of this script, i.e. qzhou_jax/assets)")
    args = ap.parse_args()
    counts = main(args.out)
    for k, v in counts.items():
        print(f"{k}: {v} records")


if __name__ == "__main__":
    _cli()
