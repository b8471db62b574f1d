.PHONY: setup demo test test-slow

setup:
	scripts/setup.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh

test-slow:
	scripts/test.sh -m slow
