"""The Chinese terms the lessons use are the glossary's, one word per term."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CJK = re.compile(r"[\u4e00-\u9fff]+")
#: Words the course does not use, and the one it uses instead.
AVOIDED = {
    "规约": "归约",
    "秩": "进程序号",
    "令牌": "token / 词元",
    "全交换": "全对全",
    "一前一后": "一次前向一次反向",
}


def glossary_chinese() -> str:
    rows = [
        line.split("|")
        for line in (ROOT / "GLOSSARY.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| English")
    ]
    return " / ".join(row[2] for row in rows if len(row) > 3)


def course_texts():
    for folder in ("notebooks", "solutions"):
        yield from sorted((ROOT / folder).glob("*.py"))
    yield ROOT / "README.md"


def test_every_chinese_word_in_a_lesson_is_in_the_glossary():
    known = glossary_chinese() + " 术语表 术语 中文"
    missing = {}
    for path in course_texts():
        for word in CJK.findall(path.read_text()):
            if word not in known:
                missing.setdefault(word, path.relative_to(ROOT).as_posix())
    assert not missing, f"Chinese words missing from GLOSSARY.md (word: first file): {missing}"


def test_avoided_words_appear_nowhere():
    for path in [*course_texts(), ROOT / "GLOSSARY.md"]:
        text = path.read_text()
        for word, instead in AVOIDED.items():
            assert word not in text, f"{path.name} uses {word}; the course says {instead}"
