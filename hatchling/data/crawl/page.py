"""What the crawler learns from one fetched page: its links, its robots directives, its license and
its main text and language. Pure functions of the page, so each rule is tested without a crawl.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin, urlsplit

from parsel import Selector

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = (*HTML_TYPES, "text/plain")

# Where a page states its license: rel=license links, license meta tags, and sentences of its text
# that speak of licenses, copyright or reserved rights (footers of most sites).
_LICENSE_META = ("license", "dc.rights", "dcterms.license", "dc.license", "copyright", "rights")
_LICENSE_SENTENCE = re.compile(r"[^.\n]*\b(?:licen[cs]e[ds]?|copyright|rights reserved)\b[^.\n]*", re.I)


@dataclass
class Page:
    links: list[str] = field(default_factory=list)     # absolute, fragment-free, in document order
    noindex: bool = False
    nofollow: bool = False
    license_evidence: list[str] = field(default_factory=list)
    text: str = ""


def doc_id(url: str) -> str:
    """A document's id: a hash of its URL (a mirror's pages: of their mirror:// URL, stable across ports)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def robots_directives(sel: Selector, bot_name: str) -> set[str]:
    """Directives of <meta name="robots"> and of a meta tag naming this bot (e.g. "hatchlingbot")."""
    names = ("robots", bot_name.lower())
    found: set[str] = set()
    for meta in sel.xpath("//meta[@name]"):
        if (meta.attrib.get("name") or "").strip().lower() in names:
            found |= {d.strip().lower() for d in (meta.attrib.get("content") or "").split(",")}
    if "none" in found:
        found |= {"noindex", "nofollow"}
    return found


def page_links(sel: Selector, base_url: str) -> list[str]:
    """http(s) links of <a href>, made absolute, without fragments, skipping rel=nofollow links."""
    base = sel.xpath("//base/@href").get()
    base_url = urljoin(base_url, base) if base else base_url
    links, seen = [], set()
    for a in sel.xpath("//a[@href]"):
        if "nofollow" in (a.attrib.get("rel") or "").lower().split():
            continue
        url = urldefrag(urljoin(base_url, a.attrib["href"].strip()))[0]
        if urlsplit(url).scheme in ("http", "https") and url not in seen:
            seen.add(url)
            links.append(url)
    return links


def license_sentences(text: str) -> list[str]:
    """Sentences that speak of licenses, copyright or reserved rights (most sites' footers)."""
    return [m.group(0).strip() for m in _LICENSE_SENTENCE.finditer(text)]


def license_evidence(sel: Selector) -> list[str]:
    """Statements of the page's license, strongest first: rel=license, meta tags, text sentences."""
    evidence = [" ".join(filter(None, (a.attrib.get("href"), a.xpath("string()").get())))
                for a in sel.xpath("//*[self::a or self::link][contains(concat(' ', @rel, ' '), ' license ')]")]
    evidence += [m.attrib.get("content", "") for m in sel.xpath("//meta[@name]")
                 if m.attrib["name"].strip().lower() in _LICENSE_META]
    body_text = " ".join(sel.xpath("//body//text()[not(ancestor::script) and not(ancestor::style)]").getall())
    evidence += license_sentences(body_text)
    return [e for e in evidence if e]


def classify_license(evidence: list[str], allow: dict[str, str], deny: list[str]) -> tuple[str | None, str | None]:
    """(license label, denying keyword): a deny keyword anywhere wins; else the first allow keyword
    found (in evidence order) gives the label; (None, None) when the page states nothing we know."""
    lowered = [e.lower() for e in evidence]
    for keyword in deny:
        if any(keyword.lower() in e for e in lowered):
            return None, keyword
    for e in lowered:
        for keyword, label in allow.items():
            if keyword.lower() in e:
                return label, None
    return None, None


def main_text(html: str, url: str) -> str:
    """The page's main content as plain text (trafilatura: boilerplate, navigation and comments out;
    tables and code kept)."""
    import trafilatura

    return trafilatura.extract(html, url=url, include_comments=False, include_tables=True, favor_recall=True,
                               deduplicate=False) or ""


def analyze_html(html: str, url: str, bot_name: str) -> Page:
    sel = Selector(text=html)
    directives = robots_directives(sel, bot_name)
    return Page(links=page_links(sel, url), noindex="noindex" in directives, nofollow="nofollow" in directives,
                license_evidence=license_evidence(sel), text=main_text(html, url))


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) by py3langid's offline model, on the first 20k characters."""
    lang, prob = _identifier().classify(text[:20_000])
    return lang, float(prob)
