"""Label Studio label configs alpipe can serve: one image, one single-choice <Choices> over it.

A Label Studio project's labeling interface is an XML document. alpipe trains image classifiers, so
it accepts exactly the configs whose annotations are "this image is class X": one <Image> (the
object, whose `value="$key"` names the task's data field holding the image URL) and one <Choices>
with `toName` that image and a single choice. Layout tags may surround them; any other control tag
(a rectangle, a text area, a second choice set...) would make annotations alpipe cannot learn
from, so such a config is refused with what to change.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

from ..projects import Invalid

# Tags that only arrange or decorate the interface (and plain text shown beside the image).
_LAYOUT_TAGS = {"View", "Header", "Style", "Collapse", "Panel", "Filter", "Text", "HyperText", "Paragraphs"}
# Options of a control tag: they count with their parent (<Choices>, or a refused <Labels>).
_OPTION_TAGS = {"Choice", "Label"}
_SINGLE_CHOICE = {None, "single", "single-radio"}


@dataclass(frozen=True)
class ImageClassification:
    """What alpipe needs of a label config: where the image is and how a class is written back."""

    data_key: str     # the task's data field with the image URL ($image -> "image")
    image_name: str   # <Image name>: the `to_name` of results
    choices_name: str  # <Choices name>: the `from_name` of results
    classes: list[str]

    def result(self, label: str) -> list[dict]:
        """A Label Studio `result` saying "this image is `label`"."""
        return [{"from_name": self.choices_name, "to_name": self.image_name, "type": "choices",
                 "value": {"choices": [label]}}]

    def label_of(self, result: list[dict]) -> str | None:
        """The class an annotation's result chose; None when it chose nothing; Invalid for anything else."""
        chosen = [item for item in result or [] if item.get("from_name") == self.choices_name
                  and item.get("type", "choices") == "choices"]
        if not chosen:
            return None
        choices = (chosen[-1].get("value") or {}).get("choices") or []
        if len(choices) != 1:
            raise Invalid(f"the annotation chooses {len(choices)} classes in {self.choices_name!r}; "
                          "alpipe needs exactly one")
        label = choices[0]
        if label not in self.classes:
            raise Invalid(f"the annotation's choice {label!r} is not a class of this project; classes: "
                          f"{', '.join(self.classes)} (add it to the label config and to the alpipe project)")
        return label


_HELP = ('alpipe serves single-image classification: <View><Image name="image" value="$image"/>'
         '<Choices name="label" toName="image"><Choice value="cat"/><Choice value="dog"/></Choices></View>')


def parse_label_config(xml: str) -> ImageClassification:
    """The image and classes of a label config; Invalid naming what is wrong otherwise."""
    if not xml or not xml.strip():
        raise Invalid(f"the label config is empty; {_HELP}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise Invalid(f"the label config is not valid XML ({e}); {_HELP}") from None
    images, choice_sets, others = [], [], []
    for element in root.iter():
        if element.tag == "Image":
            images.append(element)
        elif element.tag == "Choices":
            choice_sets.append(element)
        elif element.tag not in _LAYOUT_TAGS and element.tag not in _OPTION_TAGS:
            others.append(element)
    if others:
        shown = ", ".join(f"<{e.tag}{' name=' + repr(e.get('name')) if e.get('name') else ''}>" for e in others[:3])
        raise Invalid(f"the label config has {shown}, which alpipe cannot learn from; {_HELP}")
    if len(images) != 1:
        raise Invalid(f"the label config has {len(images)} <Image> tags; alpipe needs exactly one. {_HELP}")
    if len(choice_sets) != 1:
        raise Invalid(f"the label config has {len(choice_sets)} <Choices> tags; alpipe needs exactly one. {_HELP}")
    image, choices = images[0], choice_sets[0]
    image_name, value = image.get("name"), image.get("value") or ""
    if not image_name or not value.startswith("$") or len(value) < 2:
        raise Invalid(f'<Image> needs a name and value="$<data field>" (got name={image_name!r}, '
                      f"value={value!r}); {_HELP}")
    choices_name = choices.get("name")
    if not choices_name or choices.get("toName") != image_name:
        raise Invalid(f"<Choices> needs a name and toName={image_name!r} (the <Image>); got "
                      f"name={choices_name!r}, toName={choices.get('toName')!r}")
    if choices.get("choice") not in _SINGLE_CHOICE:
        raise Invalid(f"<Choices choice={choices.get('choice')!r}> lets an annotation pick several classes; "
                      'alpipe classifies into one: use choice="single" (the default)')
    # An annotation stores a choice's alias when it has one, else its value.
    classes = [c.get("alias") or c.get("value") or "" for c in choices.iter("Choice")]
    if len(classes) < 2 or not all(c.strip() for c in classes):
        raise Invalid(f"<Choices name={choices_name!r}> needs at least two <Choice value=...> with non-empty "
                      f"values; got {classes}")
    repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
    if repeated:
        raise Invalid(f"<Choice> values repeat: {', '.join(repeated)}; each class must appear once")
    return ImageClassification(data_key=value[1:], image_name=image_name, choices_name=choices_name,
                               classes=classes)
