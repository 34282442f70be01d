"""Few-shot segmentation data: PASCAL-5i, COCO-20i, list files, episodes."""
