"""Chat templates the presets name (`model.chat_template: chatml | gemma | mistral`), as the α-DPO
authors set them where the model's own differs."""

# ChatML, the template of SmolLM2 and of the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma-2's template as the α-DPO authors set it (their repository's
# training_configs/gemma-2-9b-it-alpha-dpo.yaml): a system message is trimmed, followed by a blank
# line and merged into the first message, the assistant's role is called model, and every turn's
# content is trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral-Instruct's template as the α-DPO authors install it (MISTRAL_CHAT_TEMPLATE in their
# repository's scripts/run_alpha_dpo.py): a system message is stripped, followed by a blank line and merged into
# the first message; user turns are `[INST] text [/INST]`, assistant turns ` text </s>`, contents
# stripped. No BOS in the text (the tokenisation adds it) and no generation prompt (the model
# continues after `[/INST]`).
MISTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
