from museum.text.tokenize import NUMBER_TOKEN, YEAR_TOKEN, Tokenizer, tokenize


def test_case_numbers_and_abbreviations():
    assert tokenize("Монета. Две копейки. 1789 г.") == ["монета", "две", "копейки", YEAR_TOKEN, "г."]
    assert tokenize("Медаль № 5, 1941–1945 гг.") == ["медаль", "№", NUMBER_TOKEN, YEAR_TOKEN, YEAR_TOKEN, "гг."]
    assert tokenize("XIX в. 3,5 см") == ["xix", "в.", NUMBER_TOKEN, "см."[:-1]]


def test_yo_folding_hyphens_and_punctuation():
    assert tokenize("Ёлочная игрушка «Петух»") == ["елочная", "игрушка", "петух"]
    assert tokenize("Блокнот-памятка.") == ["блокнот-памятка"]
    assert tokenize("") == []
    assert tokenize("…!!!") == []


def test_abbreviation_dot_only_for_known_abbreviations():
    # «Фото.» ends a sentence; «худ.» abbreviates «художник».
    assert tokenize("Фото. Худ. Е. Аносов") == ["фото", "худ.", "е", "аносов"]


def test_lemmatizer():
    tokenize_lemmas = Tokenizer(lemmatize=True)
    assert tokenize_lemmas("Монеты копейками 1789 г.") == ["монета", "копейка", YEAR_TOKEN, "г."]
