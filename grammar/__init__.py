"""The .flow grammar as a file (flow.lark) with its path; loaded by compiler/parser.py."""

from pathlib import Path

PATH = str(Path(__file__).with_name("flow.lark"))
