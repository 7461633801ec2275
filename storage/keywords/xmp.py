"""Parse, merge and serialise XMP packets with a real XML library.

Untrusted packets (sidecars, embedded XMP) are parsed with defusedxml, which refuses DTDs and
entity tricks. Merging keeps every property and keyword another tool or the user set; only the
keywords phototag wrote before (``previous`` leaves, and hierarchical keywords under the
``phototag`` root) are replaced.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import defusedxml
import defusedxml.ElementTree as SafeET

from .tagpaths import KeywordPath, dedupe, is_ours_digikam, is_ours_lightroom

X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"

CORE_PREFIXES = {"x": X, "rdf": RDF, "dc": DC, "lr": LR, "digiKam": DIGIKAM}

DC_SUBJECT = f"{{{DC}}}subject"
LR_HIERARCHICAL = f"{{{LR}}}hierarchicalSubject"
DIGIKAM_TAGSLIST = f"{{{DIGIKAM}}}TagsList"
_DESCRIPTION = f"{{{RDF}}}Description"
_LI = f"{{{RDF}}}li"
_CONTAINERS = {f"{{{RDF}}}{name}" for name in ("Bag", "Seq", "Alt")}

_XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
_XPACKET_END = '<?xpacket end="w"?>'
_PADDING_LINE = " " * 99 + "\n"


class XmpError(ValueError):
    """The packet is not XMP we can safely rewrite."""


@dataclass
class XmpDoc:
    root: ET.Element  # x:xmpmeta, or rdf:RDF for packets without the wrapper
    rdf: ET.Element
    prefixes: dict[str, str] = field(default_factory=dict)  # prefix -> namespace, from the source


def new_doc() -> XmpDoc:
    root = ET.Element(f"{{{X}}}xmpmeta", {f"{{{X}}}xmptk": "phototag"})
    rdf = ET.SubElement(root, f"{{{RDF}}}RDF")
    ET.SubElement(rdf, _DESCRIPTION, {f"{{{RDF}}}about": ""})
    return XmpDoc(root, rdf)


def parse(data: bytes) -> XmpDoc:
    """Parse an XMP packet (with or without ``<?xpacket?>`` wrapper); XmpError if unusable."""
    data = data.rstrip(b"\x00")
    if not data.strip():
        raise XmpError("empty XMP packet")
    prefixes: dict[str, str] = {}
    try:
        events = SafeET.iterparse(io.BytesIO(data), events=("start-ns",), forbid_dtd=True)
        for _event, (prefix, uri) in events:
            prefixes.setdefault(prefix, uri)
        root = events.root
    except (ET.ParseError, defusedxml.DefusedXmlException) as exc:
        raise XmpError(f"not valid XML: {exc}") from None
    if root.tag == f"{{{RDF}}}RDF":
        rdf = root
    else:
        rdf = root.find(f"{{{RDF}}}RDF")
        if rdf is None:
            raise XmpError(f"no rdf:RDF element (root is {root.tag})")
    return XmpDoc(root, rdf, prefixes)


def _descriptions(doc: XmpDoc) -> list[ET.Element]:
    found = doc.rdf.findall(_DESCRIPTION)
    if not found:
        found = [ET.SubElement(doc.rdf, _DESCRIPTION, {f"{{{RDF}}}about": ""})]
    return found


def _find_property(doc: XmpDoc, qname: str) -> tuple[ET.Element, ET.Element] | None:
    """(description, property element) of the first occurrence of ``qname``."""
    for desc in doc.rdf.findall(_DESCRIPTION):
        prop = desc.find(qname)
        if prop is not None:
            return desc, prop
        if qname in desc.attrib:
            raise XmpError(f"{_short(qname)} is a simple value, not a list")
    return None


def _container(prop: ET.Element, qname: str) -> ET.Element:
    for child in prop:
        if child.tag in _CONTAINERS:
            return child
    raise XmpError(f"{_short(qname)} is not an rdf:Bag/Seq list")


def _short(qname: str) -> str:
    uri, _, local = qname[1:].partition("}")
    prefix = next((p for p, u in CORE_PREFIXES.items() if u == uri), uri)
    return f"{prefix}:{local}"


def get_list(doc: XmpDoc, qname: str) -> list[str]:
    """Values of a list property (e.g. dc:subject); [] when absent."""
    found = _find_property(doc, qname)
    if found is None:
        return []
    return [(li.text or "").strip() for li in _container(found[1], qname).findall(_LI)]


def _replace_list(
    doc: XmpDoc, qname: str, kind: str, is_ours, new_values: Iterable[str]
) -> list[str]:
    """Drop our old values of a list property, append ``new_values``; keep everything else.

    Existing ``rdf:li`` elements that stay are kept as they are (with any qualifiers). Returns
    the values added by us (those not already present as someone else's).
    """
    found = _find_property(doc, qname)
    if found is None:
        desc, prop, container = _descriptions(doc)[0], None, None
        kept: list[ET.Element] = []
    else:
        desc, prop = found
        container = _container(prop, qname)
        kept = [li for li in container.findall(_LI) if not is_ours((li.text or "").strip())]
    kept_values = {(li.text or "").strip() for li in kept}
    added = [v for v in dedupe(new_values) if v not in kept_values]
    if not kept and not added:
        if prop is not None:
            desc.remove(prop)
        return []
    if prop is None:
        prop = ET.SubElement(desc, qname)
        container = ET.SubElement(prop, f"{{{RDF}}}{kind}")
    for li in list(container):
        container.remove(li)
    container.extend(kept)
    for value in added:
        ET.SubElement(container, _LI).text = value
    return added


def merge_keywords(
    doc: XmpDoc,
    keywords: list[KeywordPath],
    previous: Collection[str],
    also_users: Collection[str] = (),
) -> list[str]:
    """Write ``keywords`` into ``doc``, replacing only what phototag wrote before.

    ``previous``: the dc:subject leaves phototag wrote last time. ``also_users``: keywords the user
    holds elsewhere (EXIF XPKeywords), never claimed as ours. Returns the leaves phototag now owns
    — store them and pass them as ``previous`` next time. A leaf the user already had is written
    only once and stays the user's.
    """
    previous = set(previous)
    leaves = [k.leaf for k in keywords]
    added = _replace_list(doc, DC_SUBJECT, "Bag", previous.__contains__, leaves)
    _replace_list(doc, LR_HIERARCHICAL, "Bag", is_ours_lightroom, [k.lightroom for k in keywords])
    _replace_list(doc, DIGIKAM_TAGSLIST, "Seq", is_ours_digikam, [k.digikam for k in keywords])
    users = set(also_users) - previous
    return [leaf for leaf in added if leaf not in users]


def _register_namespaces(prefixes: dict[str, str]) -> None:
    # ElementTree's prefix table is global: keep the source's own prefixes where they don't clash
    # with ours, then (re)assert ours so a hostile file cannot rename dc: or rdf:.
    for prefix, uri in prefixes.items():
        if prefix and prefix not in CORE_PREFIXES and prefix != "xml":
            try:
                ET.register_namespace(prefix, uri)
            except ValueError:
                pass  # reserved "ns<N>" names: ElementTree picks one itself
    for prefix, uri in CORE_PREFIXES.items():
        ET.register_namespace(prefix, uri)


def serialize(doc: XmpDoc, padding: int = 0) -> bytes:
    """The packet as UTF-8 with ``<?xpacket?>`` wrapper and about ``padding`` bytes of spaces
    (padding lets other tools edit an embedded packet in place)."""
    _register_namespaces(doc.prefixes)
    ET.indent(doc.root, space=" ")
    body = ET.tostring(doc.root, encoding="unicode")
    pad = _PADDING_LINE * (padding // len(_PADDING_LINE))
    return f"{_XPACKET_BEGIN}\n{body}\n{pad}{_XPACKET_END}".encode()
