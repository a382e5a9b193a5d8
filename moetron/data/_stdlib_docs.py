"""Collector of the built-in corpus, run as a script in a clean interpreter by `moetron.data.corpus`.

    python -I -S _stdlib_docs.py OUT.json     # writes a JSON list of documents to OUT.json

Why a separate process: the corpus must not depend on the caller's state, and an importing
process can change the standard library's namespaces (torch, for one, replaces `inspect.getfile`
when imported). A fresh `-I -S` interpreter (no site-packages, no .pth hooks, no PYTHON* variables)
sees the pristine standard library, and importing ~200 modules leaves the caller untouched.
This file therefore imports nothing outside the standard library.

Determinism inside the collector:
  - modules come from a fixed, sorted list (`sys.stdlib_module_names` minus a skip list, plus a
    fixed list of well-known submodules), never from `sys.modules`;
  - members are visited in sorted-name order, and only classes and functions *defined* in the
    module (`obj.__module__ == module.__name__`), so re-exports cannot change the text;
  - only `__doc__` strings are read (no signatures: a default's repr can hold a memory address).
"""

import contextlib
import importlib
import inspect
import io
import json
import sys
import warnings

# Modules never imported: side effects on import (a browser, a print, a window, files read from the
# working directory or written next to the module, terminal escape codes), or contents that depend
# on what else is installed (distutils is replaced by setuptools' copy when setuptools is around).
SKIP_MODULES = frozenset(
    {
        "antigravity",  # opens a web browser
        "this",  # prints the Zen of Python
        "idlelib",  # the IDLE GUI
        "turtle",  # reads turtle.cfg from the working directory
        "turtledemo",
        "tkinter",  # needs Tk
        "readline",  # may write terminal escape codes on import
        "rlcompleter",  # imports readline
        "lib2to3",  # may write grammar pickles next to itself
        "distutils",  # shadowed by setuptools' copy when setuptools is imported
        "ensurepip",
        "venv",
        "pydoc_data",  # its topics are read directly
    }
)

# Well-known submodules of stdlib packages whose package docstring alone says little.
SUBMODULES = (
    "collections.abc",
    "email.message",
    "email.parser",
    "email.utils",
    "html.parser",
    "http.client",
    "http.cookies",
    "importlib.abc",
    "importlib.machinery",
    "importlib.util",
    "json.decoder",
    "json.encoder",
    "logging.config",
    "os.path",
    "urllib.error",
    "urllib.parse",
    "urllib.request",
    "urllib.robotparser",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax.handler",
    "xml.sax.saxutils",
)


def module_names() -> list:
    """Public top-level stdlib modules (minus the skip list) and the fixed submodules, sorted."""
    names = {name for name in sys.stdlib_module_names if not name.startswith("_") and name not in SKIP_MODULES}
    names.update(SUBMODULES)
    return sorted(names)


def clean(doc) -> str:
    """A docstring with its indentation removed and surrounding blank space stripped; '' if absent."""
    if not isinstance(doc, str):  # some classes expose a descriptor or None as __doc__
        return ""
    return inspect.cleandoc(doc).strip()


def import_quietly(name: str):
    """Import a module with warnings and Python-level stdout/stderr muted; None when it cannot be imported here."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # platform-specific (winreg), missing C library (_curses), removed ...
            return None


def module_sections(module) -> list:
    """(heading, docstring) for the module, its public classes and functions, and the classes' public methods."""
    name = module.__name__
    sections = [(f"Module {name}", clean(module.__doc__))]
    namespace = vars(module)
    for member_name in sorted(namespace):
        member = namespace[member_name]
        if member_name.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if getattr(member, "__module__", None) != name:  # re-exported from elsewhere
            continue
        kind = "class" if inspect.isclass(member) else "function"
        sections.append((f"{kind} {name}.{member_name}", clean(member.__doc__)))
        if not inspect.isclass(member):
            continue
        for attr_name in sorted(vars(member)):
            attr = vars(member)[attr_name]
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if not attr_name.startswith("_") and inspect.isroutine(attr):
                sections.append((f"method {name}.{member_name}.{attr_name}", clean(attr.__doc__)))
    return sections


def collect() -> list:
    """The documents: pydoc topics sorted by name, then one document per module sorted by module name.

    A docstring already used earlier in this order is left out (C types repeat "Return self==value."
    and many re-exported classes share text), and so are empty documents.
    """
    try:
        from pydoc_data.topics import topics  # a plain dict of str -> str, in every CPython install
    except ImportError:  # some distributions package it separately: the docstrings still make a corpus
        topics = {}
    documents = []
    seen = set()
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            documents.append(text)
    for module_name in module_names():
        module = import_quietly(module_name)
        if module is None:
            continue
        parts = []
        for heading, doc in module_sections(module):
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(f"{heading}\n\n{doc}")
        if parts:
            documents.append("\n\n".join(parts))
    return documents


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -I -S {sys.argv[0]} OUT.json")
    documents = collect()
    # Written to a file, not stdout: a module may print at import time (even from C, past redirect_stdout).
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(documents, out, ensure_ascii=True)
