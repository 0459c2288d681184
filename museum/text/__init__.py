"""The text expert: tokenizer, word vectors, BiLSTM, TF-IDF expert and the blended TextModel."""
