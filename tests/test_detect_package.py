"""Tests of how keras_vg.detect is put together: one table of rules, one place for words, numpy only.

The rules themselves are tested in test_detect.py.
"""

import os
import subprocess
import sys

from keras_vg import detect
from keras_vg.detect import messages, rules


def test_every_rule_has_words_and_every_text_a_rule():
    assert set(messages.RULE_TEXTS) == set(detect.RULE_NAMES[1:])
    assert set(messages.KIND_TITLES) == set(detect.KINDS)


def test_class_precedence_ranks_every_class_once_and_follows_the_rule_table():
    assert sorted(detect.CLASS_PRECEDENCE) == list(range(len(detect.CLASS_NAMES)))
    assert detect.CLASS_PRECEDENCE[-1] == detect.HEALTHY
    # The rule table's order is the precedence `classify` applies: the first rule of each class comes in that order.
    first_rule_of = {}
    for rule in rules._RULES[1:]:
        if rule.code != detect.HEALTHY:
            first_rule_of.setdefault(rule.code, rule.name)
    assert list(first_rule_of) == list(detect.CLASS_PRECEDENCE[:-1])


def test_the_package_imports_neither_keras_nor_tensorflow():
    code = ("import sys, keras_vg.detect\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'jax')))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=root).stdout
    assert output.strip() == "[]"
