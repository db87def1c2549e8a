"""The crawl stage: a polite Scrapy crawler (spider.py), page rules (page.py), the offline default
mirror (mirror.py) and the stage that ties them together (stage.py)."""
