//! Chat templates rendered like transformers' `apply_chat_template` (reference outputs in
//! `data/tokenizer/chat_templates.json`, made with transformers + jinja2).

mod tokenizer_support;

use model::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};
use serde_json::Value;
use tokenizer_support::{read_json, small_vocab};

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("conversation")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

#[test]
fn templates_match_transformers() {
    let fixture = read_json("chat_templates.json");
    let bos = fixture["bos_token"].as_str().map(str::to_owned);
    let eos = fixture["eos_token"].as_str().map(str::to_owned);
    let cases = fixture["cases"].as_array().expect("cases");
    let (mut total, mut bad) = (0, 0);
    for case in cases {
        let name = case["template"].as_str().expect("template name");
        let conversation = case["conversation"].as_str().expect("conversation name");
        let agp = case["add_generation_prompt"].as_bool().expect("flag");
        let source = fixture["templates"][name].as_str().expect("template");
        let template = ChatTemplate::new(source, bos.clone(), eos.clone()).expect("compiles");
        let msgs = messages(&fixture["conversations"][conversation]);
        let got = template.render(&msgs, agp);
        total += 1;
        let ok = match (&got, case.get("output"), case.get("error")) {
            (Ok(out), Some(want), _) => want.as_str() == Some(out.as_str()),
            (
                Err(TokenizerError::ChatTemplate {
                    message,
                    raised: true,
                    ..
                }),
                None,
                Some(want),
            ) => want.as_str() == Some(message.as_str()),
            _ => false,
        };
        if !ok {
            bad += 1;
            eprintln!(
                "{name}/{conversation}/agp={agp}:\n want {:?}\n got  {got:?}",
                case.get("output").or(case.get("error"))
            );
        }
    }
    eprintln!("{} of {total} renders match transformers", total - bad);
    assert!(total >= 40);
    assert_eq!(bad, 0);
}

#[test]
fn smollm2_template_from_gguf() {
    // The GGUF's own template, through the tokenizer (bos/eos texts from the vocabulary).
    let tok = Tokenizer::from_gguf(&small_vocab(1200)).expect("from_gguf");
    let fixture = read_json("chat_templates.json");
    let msgs = messages(&fixture["conversations"]["multi_turn"]);
    let want = fixture["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| {
            c["template"] == "smollm2"
                && c["conversation"] == "multi_turn"
                && c["add_generation_prompt"] == true
        })
        .and_then(|c| c["output"].as_str())
        .expect("reference");
    assert_eq!(
        tok.apply_chat_template(&msgs, true).ok().as_deref(),
        Some(want)
    );
    let user_only = tok
        .apply_chat_template(&[ChatMessage::user("Hi")], false)
        .expect("render");
    assert_eq!(
        user_only,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // The rendered prompt encodes its markers as single special tokens.
    let ids = tok.encode(&user_only, false).expect("encode");
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 2);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}

#[test]
fn template_errors_are_typed() {
    // Syntax error at compile time.
    assert!(matches!(
        ChatTemplate::new("{% for m in messages %}", None, None),
        Err(TokenizerError::ChatTemplate { raised: false, .. })
    ));
    // Runtime error (not raised by the template) carries minijinja's message.
    let template =
        ChatTemplate::new("{{ messages[0].content.nope() }}", None, None).expect("compiles");
    match template.render(&[ChatMessage::user("x")], false) {
        Err(TokenizerError::ChatTemplate {
            raised: false,
            message,
            ..
        }) => assert!(!message.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    // `raise_exception` is a client error with the template's exact message.
    let template = ChatTemplate::new(
        "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}ok",
        None,
        None,
    )
    .expect("compiles");
    match template.render(&[], false) {
        Err(TokenizerError::ChatTemplate {
            raised: true,
            message,
            ..
        }) => assert_eq!(message, "need a message"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        template
            .render(&[ChatMessage::system("s")], false)
            .ok()
            .as_deref(),
        Some("ok")
    );
}

#[test]
fn hf_variables_and_loop_controls() {
    let template = ChatTemplate::new(
        "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ documents is none }}|\
         {% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }},\
         {% endfor %}|{{ add_generation_prompt }}|{{ undefined_var is defined }}",
        Some("<s>".into()),
        Some("</s>".into()),
    )
    .expect("compiles");
    let msgs = [
        ChatMessage::system("a"),
        ChatMessage::user("b"),
        ChatMessage::assistant("c"),
    ];
    assert_eq!(
        template.render(&msgs, true).ok().as_deref(),
        Some("<s>|</s>|True|True|system,user,|True|False")
    );
    // Booleans print as in Python (jinja2). Without special tokens they are undefined (render as empty), as when HF has none.
    let template = ChatTemplate::new("[{{ bos_token }}]", None, None).expect("compiles");
    assert_eq!(template.render(&[], false).ok().as_deref(), Some("[]"));
}
