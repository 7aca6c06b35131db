"""The playground page (GET /) of `finetune serve --with-base --api-key KEY`, on a real uvicorn, driven in a headless
Chromium through Selenium: it asks for the key, streams completions and chat replies of a tuned model and its base
side by side (the text shown equals the non-streamed greedy reply), and shows the API's error for a bad setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import background_server, single_thread

from finetune.recipe import load_recipe
from finetune.serve import load_workers
from finetune.serve.app import create_app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs the system's Chromium: apt-get install chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "playground-key"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm, too small for Chromium
                  "--window-size=1280,900"]


@pytest.fixture(scope="module")
def url(finished_runs: dict[str, Path]) -> Iterator[str]:
    """The models `finetune serve --with-base` loads for the LoRA run (tiny-lora, and tiny-full as its extra run,
    each with its base model) in its app, with an API key, on uvicorn."""
    recipe = load_recipe(finished_runs["lora"])
    app = create_app(load_workers(recipe, with_base=True), api_key=KEY, limits=recipe.serve)
    with single_thread(), background_server(app) as address:
        yield address


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what: str, seconds: float = 60):
    """Until `condition(driver)` is truthy; the timeout only turns a hang into a failure."""
    return WebDriverWait(driver, seconds).until(condition, message=f"still waiting for {what}")


def open_page(browser, url: str) -> None:
    """The page loaded and unlocked with the API key."""
    browser.get(f"{url}/")
    wait(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed(), "the API key form")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: d.find_element(By.ID, "ask").is_displayed(), "the models to load")


def fill(browser, **fields: str) -> None:
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)


def watch_replies(browser) -> None:
    """Records every text each column's last reply shows, as the page changes it (window.shown[model])."""
    browser.execute_script("""
        window.shown = {};
        for (const column of document.querySelectorAll(".column")) {
          const seen = window.shown[column.dataset.model] = [];
          new MutationObserver(() => {
            const replies = column.querySelectorAll(".reply");
            if (replies.length) seen.push(replies[replies.length - 1].textContent);
          }).observe(column, {childList: true, subtree: true, characterData: true});
        }""")


def send(browser, keyboard: bool = False) -> dict[str, dict[str, str]]:
    """Sends the form (Send, or with `keyboard` Ctrl+Enter in the text box); per column (model), its last reply,
    error and stats once every column has finished."""
    if keyboard:
        browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        browser.find_element(By.ID, "send").click()
    finished = """return [...document.querySelectorAll(".column")].every(c =>
                    c.querySelector(".stats").textContent || c.querySelector(".error").textContent)
                  && !document.getElementById("send").disabled"""
    wait(browser, lambda d: d.execute_script(finished), "every column to finish")
    return browser.execute_script("""
        const result = {};
        for (const column of document.querySelectorAll(".column")) {
          const replies = column.querySelectorAll(".reply");
          result[column.dataset.model] = {reply: replies.length ? replies[replies.length - 1].textContent : null,
            error: column.querySelector(".error").textContent, stats: column.querySelector(".stats").textContent};
        }
        return result;""")


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_the_page_asks_for_the_key_and_streams_greedy_completions_side_by_side(url: str, browser, tmp_path) -> None:
    page = httpx.get(f"{url}/")  # the page itself needs no key; the API does
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    browser.get(f"{url}/")
    wait(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed(), "the API key form")
    assert not browser.find_element(By.ID, "ask").is_displayed()
    fill(browser, **{"api-key": "wrong"})
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: "missing or wrong API key" in d.find_element(By.ID, "status").text, "the key refused")
    open_page(browser, url)
    served = ["tiny-lora", "tiny-lora-base", "tiny-full", "tiny-full-base"]
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == served
    assert Select(browser.find_element(By.ID, "compare")).first_selected_option.text == "tiny-lora-base"

    fill(browser, prompt="alpha", temperature="0", max_tokens="40")
    watch_replies(browser)
    shown = send(browser)
    assert list(shown) == ["tiny-lora", "tiny-lora-base"]  # tuned and base side by side
    for model in ("tiny-lora", "tiny-lora-base"):
        plain = post(url, "/v1/completions", {"model": model, "prompt": "alpha", "max_tokens": 40, "temperature": 0})
        expected = plain.json()["choices"][0]["text"]
        assert shown[model]["reply"] == expected and shown[model]["error"] == ""
        assert shown[model]["stats"].startswith(f"{plain.json()['usage']['completion_tokens']} tokens in")
        steps = [text for text in dict.fromkeys(browser.execute_script(f"return window.shown[{model!r}]")) if text]
        # the text grew in pieces, in order: 29 to 40 distinct texts for the 40 tokens were measured (10 sends on a
        # loaded 2-core machine); a page showing the reply at the end only would show 1
        assert len(steps) >= 5 and steps[-1] == expected, steps
        assert all(expected.startswith(step) for step in steps)
    full = post(url, "/v1/completions", {"model": "tiny-full", "prompt": "alpha", "max_tokens": 40, "temperature": 0})
    assert shown["tiny-lora-base"]["reply"] == full.json()["choices"][0]["text"] != shown["tiny-lora"]["reply"]
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(f"{url}/") for name in loaded), loaded  # nothing from elsewhere
    assert browser.save_screenshot(str(tmp_path / "playground.png"))


def test_chat_in_the_page_keeps_each_models_conversation(url: str, browser) -> None:
    open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=chat]").click()
    fill(browser, temperature="0", max_tokens="16")
    history: dict[str, list[dict]] = {"tiny-lora": [], "tiny-lora-base": []}
    for message, keyboard in (("alpha beta", False), ("pi rho", True)):
        fill(browser, prompt=message)
        shown = send(browser, keyboard)
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == ""  # sent: the box is empty again
        for model, messages in history.items():
            messages.append({"role": "user", "content": message})
            body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0}
            expected = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
            assert shown[model]["reply"] == expected and shown[model]["error"] == ""
            messages.append({"role": "assistant", "content": expected})
    assert len(browser.find_elements(By.CSS_SELECTOR, ".column[data-model=tiny-lora-base] .user")) == 2


def test_a_bad_setting_shows_the_apis_error(url: str, browser) -> None:
    open_page(browser, url)
    fill(browser, prompt="alpha", temperature="5")
    shown = send(browser)
    refused = post(url, "/v1/completions", {"model": "tiny-lora", "prompt": "alpha", "temperature": 5, "stream": True})
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "temperature" in message
    for model in ("tiny-lora", "tiny-lora-base"):
        assert shown[model]["error"] == message and shown[model]["reply"] == ""
