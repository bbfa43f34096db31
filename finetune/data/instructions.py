"""Instruction wordings that turn captions and short-answer QA into instruction data.

Many phrasings per task, so a model tuned on them follows the intent rather than one sentence.
"""
from __future__ import annotations

# Brief-description requests for COCO captions; one is drawn per record.
BRIEF_CAPTION_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Give a short caption.",
    "Provide a brief description of the image.",
    "Write a one-sentence caption for this picture.",
    "Summarize what the photo shows in a few words.",
    "What does this image show? Answer briefly.",
    "Offer a succinct description of the picture.",
    "Caption this image.",
    "Briefly describe what you see.",
    "Give a compact summary of the scene.",
    "In one sentence, what is happening in this image?",
    "Write a short, clear caption for the photo.",
    "Describe the scene in a single sentence.",
    "Share a concise account of the image's content.",
    "Provide a short caption that captures the main subject.",
    "Sum up the picture in one line.",
)

# LLaVA-1.5's prompt for short-answer VQA (VQAv2, GQA, ...), on its own line after the question.
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
