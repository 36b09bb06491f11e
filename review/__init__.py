"""The review workbench: a web app where radiologists work through flagged images and record verdicts."""
