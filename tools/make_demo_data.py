"""Regenerate lmtune/data/demo_alpaca.jsonl, the built-in demo's training data.

Short facts about 60 countries in three fixed question forms with one-line
answers: a tiny model created from random weights learns them in a couple of
minutes on a CPU, and its answers are visibly right or wrong.
"""

import json
import random
from pathlib import Path

COUNTRIES = [
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"), ("Austria", "Vienna", "Europe"), ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"), ("Finland", "Helsinki", "Europe"), ("Denmark", "Copenhagen", "Europe"),
    ("Ireland", "Dublin", "Europe"), ("Hungary", "Budapest", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Netherlands", "Amsterdam", "Europe"), ("Czechia", "Prague", "Europe"), ("Romania", "Bucharest", "Europe"),
    ("Ukraine", "Kyiv", "Europe"), ("Iceland", "Reykjavik", "Europe"), ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"), ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"), ("Indonesia", "Jakarta", "Asia"), ("Nepal", "Kathmandu", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"), ("Iran", "Tehran", "Asia"), ("Iraq", "Baghdad", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Philippines", "Manila", "Asia"), ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"), ("Ghana", "Accra", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Morocco", "Rabat", "Africa"), ("Senegal", "Dakar", "Africa"),
    ("Uganda", "Kampala", "Africa"), ("Zambia", "Lusaka", "Africa"), ("Algeria", "Algiers", "Africa"),
    ("Canada", "Ottawa", "North America"), ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"), ("Jamaica", "Kingston", "North America"),
    ("Panama", "Panama City", "North America"), ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"), ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"), ("Colombia", "Bogota", "South America"),
    ("Ecuador", "Quito", "South America"), ("Uruguay", "Montevideo", "South America"),
    ("Venezuela", "Caracas", "South America"), ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"), ("Fiji", "Suva", "Oceania"), ("Samoa", "Apia", "Oceania"),
    ("Tonga", "Nukualofa", "Oceania"),
]


def rows():
    for country, capital, continent in COUNTRIES:
        yield {"instruction": f"What is the capital of {country}?", "input": "", "output": f"{capital}."}
        yield {"instruction": f"Which country has the capital {capital}?", "input": "", "output": f"{country}."}
        yield {"instruction": f"Which continent is {country} in?", "input": "", "output": f"{continent}."}


if __name__ == "__main__":
    data = list(rows())
    random.Random(0).shuffle(data)
    out = Path(__file__).resolve().parents[1] / "lmtune" / "data" / "demo_alpaca.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    print(f"wrote {len(data)} rows to {out}")
