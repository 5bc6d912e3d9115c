//! The benchmark's vocabulary: categories (with synonyms, plurals, shapes, allowed colours),
//! colours, category groups, functions (affordances) and the held-out category-colour
//! combinations of the test split. [`lexicon`] exports all of it as JSON-friendly data for
//! evaluators (CHAIR finds object mentions with [`Lexicon::mention_forms`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Colour names and their base RGB (0..1) before per-object jitter and shading.
pub(crate) const COLOURS: &[(&str, [f32; 3])] = &[
    ("red", [0.80, 0.13, 0.12]),
    ("orange", [0.94, 0.50, 0.10]),
    ("yellow", [0.94, 0.84, 0.18]),
    ("green", [0.22, 0.62, 0.22]),
    ("blue", [0.15, 0.35, 0.82]),
    ("purple", [0.52, 0.22, 0.68]),
    ("pink", [0.96, 0.55, 0.72]),
    ("brown", [0.48, 0.29, 0.13]),
    ("white", [0.94, 0.94, 0.91]),
];

pub(crate) const RED: u8 = 0;
pub(crate) const ORANGE: u8 = 1;
pub(crate) const YELLOW: u8 = 2;
pub(crate) const GREEN: u8 = 3;
pub(crate) const BLUE: u8 = 4;
pub(crate) const PURPLE: u8 = 5;
pub(crate) const PINK: u8 = 6;
pub(crate) const BROWN: u8 = 7;
pub(crate) const WHITE: u8 = 8;

/// Outline family of a category; see `shapes.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Ball,
    Peach,
    Apple,
    Pear,
    Lemon,
    Egg,
    Banana,
    Moon,
    Box,
    Book,
    Dice,
    Ring,
    Coin,
    Star,
    Heart,
    Hat,
    Cup,
    Bottle,
    Key,
    Leaf,
    Fish,
    Mushroom,
    Kite,
    Balloon,
    Hammer,
    Screwdriver,
    Spoon,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Ball => "circle with a band",
            Shape::Peach => "round with a crease and a leaf",
            Shape::Apple => "round with a top notch and a stem",
            Shape::Pear => "pear outline with a stem",
            Shape::Lemon => "pointed oval",
            Shape::Egg => "egg oval",
            Shape::Banana => "curved band with dark tips",
            Shape::Moon => "crescent",
            Shape::Box => "box in three-quarter view",
            Shape::Book => "rectangle with spine, pages and label",
            Shape::Dice => "rounded square with pips",
            Shape::Ring => "annulus with a gem",
            Shape::Coin => "disc with an inner ring",
            Shape::Star => "five-pointed star",
            Shape::Heart => "heart",
            Shape::Hat => "striped triangle with a pompom",
            Shape::Cup => "tapered cup with a handle",
            Shape::Bottle => "bottle with neck, cap and label",
            Shape::Key => "key (ring bow, shaft, teeth)",
            Shape::Leaf => "pointed lens with a midrib",
            Shape::Fish => "oval body with tail and eye",
            Shape::Mushroom => "spotted cap on a stem",
            Shape::Kite => "diamond with cross spars",
            Shape::Balloon => "oval with a knot",
            Shape::Hammer => "handle with a metal head",
            Shape::Screwdriver => "handle with a metal shaft",
            Shape::Spoon => "oval bowl with a handle",
        }
    }
}

/// Functions (affordances): id, instruction phrasings, answer phrasings (`{L}` = list of
/// targets with their `<seg>` tokens; modal verbs, so no number agreement is needed).
pub(crate) struct Func {
    pub id: &'static str,
    pub questions: &'static [&'static str],
    pub answers: &'static [&'static str],
}

pub(crate) const FUNCS: &[Func] = &[
    Func {
        id: "roll",
        questions: &[
            "What here could roll?",
            "Which objects would roll if I pushed them?",
            "Find everything that could roll across the table.",
            "Segment the things that can roll.",
        ],
        answers: &["{L} could roll.", "{L} would roll if pushed.", "Round things roll: {L}."],
    },
    Func {
        id: "eat",
        questions: &[
            "What could I eat?",
            "I'm hungry. What here is edible?",
            "Which of these things are food?",
            "Show me what I could have for a snack.",
        ],
        answers: &["You could eat {L}.", "{L} would make a snack.", "The edible things are {L}."],
    },
    Func {
        id: "drink",
        questions: &[
            "What could I drink from?",
            "I'm thirsty; what could hold my drink?",
            "Which objects could hold something to drink?",
        ],
        answers: &["You could drink from {L}.", "{L} could hold a drink."],
    },
    Func {
        id: "store",
        questions: &[
            "What could I keep small things in?",
            "Which objects are containers?",
            "Where could I store a few marbles?",
        ],
        answers: &["{L} could hold small things.", "You could store things in {L}."],
    },
    Func {
        id: "read",
        questions: &["What could I read?", "Is there anything to read here?", "Show me something I could read."],
        answers: &["You could read {L}.", "{L} would be something to read."],
    },
    Func {
        id: "wear",
        questions: &["What could I wear?", "Which of these could someone wear?", "Find the things you can put on."],
        answers: &["You could wear {L}.", "{L} could be worn."],
    },
    Func {
        id: "unlock",
        questions: &["What would open a lock?", "I'm locked out. What here could help?", "Which object opens doors?"],
        answers: &["{L} could open a lock.", "You could unlock a door with {L}."],
    },
    Func {
        id: "repair",
        questions: &[
            "What would help me fix a wobbly chair?",
            "Which of these are useful for repairs?",
            "Find something I could build a shelf with.",
        ],
        answers: &["{L} would help with repairs.", "You could fix things with {L}."],
    },
    Func {
        id: "play",
        questions: &[
            "What could a child play with?",
            "Which of these could I play a game with?",
            "Find something fun to play with.",
        ],
        answers: &["A child could play with {L}.", "{L} would be fun to play with."],
    },
    Func {
        id: "fly",
        questions: &["What here could fly in the air?", "Which objects could float up into the sky?"],
        answers: &["{L} could fly in the air.", "{L} could rise into the sky."],
    },
    Func {
        id: "pay",
        questions: &["What could I pay with?", "Is there any money here?", "Show me what I could buy something with."],
        answers: &["You could pay with {L}.", "{L} could buy something."],
    },
    Func {
        id: "swim",
        questions: &["Which of these can swim?", "What here lives in water?", "Find the animal that swims."],
        answers: &["{L} can swim.", "{L} would live in water."],
    },
    Func {
        id: "stir",
        questions: &[
            "What could I stir my soup with?",
            "Which object helps me eat soup?",
            "Find something to stir tea with.",
        ],
        answers: &["You could stir with {L}.", "{L} would work for soup."],
    },
];

/// Category groups: id, plural used in questions, singular used in "every {s} that...",
/// counted plural for "there are two {c}".
pub(crate) struct Group {
    pub id: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub counted: &'static str,
}

pub(crate) const GROUPS: &[Group] = &[
    Group { id: "fruit", plural: "fruit", singular: "piece of fruit", counted: "pieces of fruit" },
    Group { id: "food", plural: "food items", singular: "food item", counted: "food items" },
    Group { id: "toys", plural: "toys", singular: "toy", counted: "toys" },
    Group { id: "tools", plural: "tools", singular: "tool", counted: "tools" },
    Group { id: "kitchen", plural: "kitchen items", singular: "kitchen item", counted: "kitchen items" },
    Group { id: "containers", plural: "containers", singular: "container", counted: "containers" },
    Group { id: "decorations", plural: "decorations", singular: "decoration", counted: "decorations" },
    Group { id: "living", plural: "living things", singular: "living thing", counted: "living things" },
    Group { id: "valuables", plural: "valuables", singular: "valuable", counted: "valuables" },
];

/// One object category.
pub(crate) struct Cat {
    pub name: &'static str,
    pub plural: &'static str,
    /// (singular, plural) synonyms that instructions and answers may use.
    pub synonyms: &'static [(&'static str, &'static str)],
    pub shape: Shape,
    /// Allowed body colours (indices into [`COLOURS`]).
    pub colours: &'static [u8],
    pub groups: &'static [&'static str],
    pub funcs: &'static [&'static str],
    /// Categories that look similar (used to place look-alike distractors).
    pub lookalikes: &'static [&'static str],
    /// Largest random rotation in radians (PI: any orientation).
    pub max_rot: f32,
    /// Size multiplier (thin objects are drawn larger so they stay a few pixels wide).
    pub size: f32,
    /// Outline jitter multiplier (rigid man-made things wobble less).
    pub wobble: f32,
    /// Colour of secondary parts (stems, caps, metal heads), 0..1 RGB.
    pub secondary: [f32; 3],
}

const PI: f32 = std::f32::consts::PI;
const STEM: [f32; 3] = [0.33, 0.21, 0.10];
const LEAFG: [f32; 3] = [0.25, 0.52, 0.18];
const METAL: [f32; 3] = [0.62, 0.63, 0.67];
const NONE: [f32; 3] = [0.5, 0.5, 0.5];

pub(crate) const CATS: &[Cat] = &[
    Cat {
        name: "ball",
        plural: "balls",
        synonyms: &[("toy ball", "toy balls")],
        shape: Shape::Ball,
        colours: &[RED, ORANGE, YELLOW, GREEN, BLUE, PURPLE, PINK, WHITE],
        groups: &["toys"],
        funcs: &["roll", "play"],
        lookalikes: &["peach", "apple", "coin", "balloon"],
        max_rot: PI,
        size: 0.9,
        wobble: 0.6,
        secondary: NONE,
    },
    Cat {
        name: "peach",
        plural: "peaches",
        synonyms: &[],
        shape: Shape::Peach,
        colours: &[ORANGE, PINK, YELLOW],
        groups: &["fruit", "food"],
        funcs: &["roll", "eat"],
        lookalikes: &["ball", "apple"],
        max_rot: 0.5,
        size: 0.9,
        wobble: 1.0,
        secondary: LEAFG,
    },
    Cat {
        name: "apple",
        plural: "apples",
        synonyms: &[],
        shape: Shape::Apple,
        colours: &[RED, GREEN, YELLOW],
        groups: &["fruit", "food"],
        funcs: &["roll", "eat"],
        lookalikes: &["peach", "ball", "heart"],
        max_rot: 0.4,
        size: 0.9,
        wobble: 1.0,
        secondary: STEM,
    },
    Cat {
        name: "pear",
        plural: "pears",
        synonyms: &[],
        shape: Shape::Pear,
        colours: &[GREEN, YELLOW, BROWN],
        groups: &["fruit", "food"],
        funcs: &["eat"],
        lookalikes: &["lemon", "egg", "balloon"],
        max_rot: 0.5,
        size: 1.0,
        wobble: 1.0,
        secondary: STEM,
    },
    Cat {
        name: "lemon",
        plural: "lemons",
        synonyms: &[],
        shape: Shape::Lemon,
        colours: &[YELLOW, GREEN],
        groups: &["fruit", "food"],
        funcs: &["eat"],
        lookalikes: &["egg", "leaf", "pear"],
        max_rot: PI,
        size: 0.9,
        wobble: 1.0,
        secondary: NONE,
    },
    Cat {
        name: "egg",
        plural: "eggs",
        synonyms: &[],
        shape: Shape::Egg,
        colours: &[WHITE, BROWN],
        groups: &["food"],
        funcs: &["eat"],
        lookalikes: &["lemon", "balloon"],
        max_rot: 0.6,
        size: 0.85,
        wobble: 0.7,
        secondary: NONE,
    },
    Cat {
        name: "banana",
        plural: "bananas",
        synonyms: &[],
        shape: Shape::Banana,
        colours: &[YELLOW, GREEN, BROWN],
        groups: &["fruit", "food"],
        funcs: &["eat"],
        lookalikes: &["moon"],
        max_rot: PI,
        size: 1.15,
        wobble: 0.8,
        secondary: [0.25, 0.17, 0.07],
    },
    Cat {
        name: "moon",
        plural: "moons",
        synonyms: &[("crescent moon", "crescent moons"), ("crescent", "crescents")],
        shape: Shape::Moon,
        colours: &[YELLOW, WHITE, ORANGE],
        groups: &["decorations"],
        funcs: &[],
        lookalikes: &["banana"],
        max_rot: PI,
        size: 1.0,
        wobble: 0.8,
        secondary: NONE,
    },
    Cat {
        name: "box",
        plural: "boxes",
        synonyms: &[("crate", "crates"), ("carton", "cartons")],
        shape: Shape::Box,
        colours: &[BROWN, RED, BLUE, GREEN, YELLOW, WHITE],
        groups: &["containers"],
        funcs: &["store"],
        lookalikes: &["book", "dice"],
        max_rot: 0.15,
        size: 1.0,
        wobble: 0.25,
        secondary: NONE,
    },
    Cat {
        name: "book",
        plural: "books",
        synonyms: &[("notebook", "notebooks")],
        shape: Shape::Book,
        colours: &[RED, BLUE, GREEN, PURPLE, YELLOW, ORANGE, PINK],
        groups: &[],
        funcs: &["read"],
        lookalikes: &["box", "dice"],
        max_rot: 0.5,
        size: 1.0,
        wobble: 0.25,
        secondary: NONE,
    },
    Cat {
        name: "dice",
        plural: "dice",
        synonyms: &[],
        shape: Shape::Dice,
        colours: &[WHITE, RED, BLUE, GREEN, YELLOW, PINK],
        groups: &["toys"],
        funcs: &["play"],
        lookalikes: &["box", "book"],
        max_rot: 0.8,
        size: 0.85,
        wobble: 0.25,
        secondary: NONE,
    },
    Cat {
        name: "ring",
        plural: "rings",
        synonyms: &[],
        shape: Shape::Ring,
        colours: &[YELLOW, WHITE, PINK, PURPLE, BLUE],
        groups: &["valuables"],
        funcs: &["wear"],
        lookalikes: &["coin"],
        max_rot: 0.6,
        size: 0.95,
        wobble: 0.4,
        secondary: [0.72, 0.92, 0.97],
    },
    Cat {
        name: "coin",
        plural: "coins",
        synonyms: &[],
        shape: Shape::Coin,
        colours: &[YELLOW, WHITE, BROWN, ORANGE],
        groups: &["valuables"],
        funcs: &["roll", "pay"],
        lookalikes: &["ring", "ball"],
        max_rot: PI,
        size: 0.75,
        wobble: 0.3,
        secondary: NONE,
    },
    Cat {
        name: "star",
        plural: "stars",
        synonyms: &[],
        shape: Shape::Star,
        colours: &[YELLOW, RED, BLUE, PINK, PURPLE, ORANGE, GREEN],
        groups: &["decorations"],
        funcs: &[],
        lookalikes: &["heart", "kite"],
        max_rot: 0.6,
        size: 1.05,
        wobble: 0.6,
        secondary: NONE,
    },
    Cat {
        name: "heart",
        plural: "hearts",
        synonyms: &[],
        shape: Shape::Heart,
        colours: &[RED, PINK, PURPLE],
        groups: &["decorations"],
        funcs: &[],
        lookalikes: &["apple", "star"],
        max_rot: 0.5,
        size: 0.95,
        wobble: 0.6,
        secondary: NONE,
    },
    Cat {
        name: "hat",
        plural: "hats",
        synonyms: &[("party hat", "party hats")],
        shape: Shape::Hat,
        colours: &[RED, BLUE, GREEN, PURPLE, YELLOW, PINK, ORANGE],
        groups: &[],
        funcs: &["wear"],
        lookalikes: &["kite"],
        max_rot: 0.35,
        size: 1.05,
        wobble: 0.35,
        secondary: NONE,
    },
    Cat {
        name: "cup",
        plural: "cups",
        synonyms: &[("mug", "mugs")],
        shape: Shape::Cup,
        colours: &[WHITE, RED, BLUE, GREEN, YELLOW, PINK, PURPLE],
        groups: &["kitchen", "containers"],
        funcs: &["drink", "store"],
        lookalikes: &["bottle"],
        max_rot: 0.2,
        size: 1.0,
        wobble: 0.3,
        secondary: NONE,
    },
    Cat {
        name: "bottle",
        plural: "bottles",
        synonyms: &[("flask", "flasks")],
        shape: Shape::Bottle,
        colours: &[GREEN, BLUE, BROWN, WHITE, PURPLE],
        groups: &["kitchen", "containers"],
        funcs: &["drink", "store"],
        lookalikes: &["cup"],
        max_rot: 0.3,
        size: 1.15,
        wobble: 0.3,
        secondary: [0.22, 0.22, 0.25],
    },
    Cat {
        name: "key",
        plural: "keys",
        synonyms: &[],
        shape: Shape::Key,
        colours: &[YELLOW, WHITE, BLUE, RED, GREEN],
        groups: &["tools"],
        funcs: &["unlock"],
        lookalikes: &["hammer", "spoon"],
        max_rot: PI,
        size: 1.3,
        wobble: 0.25,
        secondary: NONE,
    },
    Cat {
        name: "leaf",
        plural: "leaves",
        synonyms: &[],
        shape: Shape::Leaf,
        colours: &[GREEN, YELLOW, ORANGE, RED, BROWN],
        groups: &["living"],
        funcs: &[],
        lookalikes: &["fish", "lemon"],
        max_rot: PI,
        size: 1.1,
        wobble: 0.8,
        secondary: NONE,
    },
    Cat {
        name: "fish",
        plural: "fish",
        synonyms: &[],
        shape: Shape::Fish,
        colours: &[ORANGE, YELLOW, BLUE, RED, PURPLE, PINK],
        groups: &["living"],
        funcs: &["swim"],
        lookalikes: &["leaf"],
        max_rot: 0.5,
        size: 1.1,
        wobble: 0.6,
        secondary: NONE,
    },
    Cat {
        name: "mushroom",
        plural: "mushrooms",
        synonyms: &[("toadstool", "toadstools")],
        shape: Shape::Mushroom,
        colours: &[RED, BROWN, WHITE],
        groups: &["food", "living"],
        funcs: &["eat"],
        lookalikes: &["apple", "hat"],
        max_rot: 0.3,
        size: 1.0,
        wobble: 0.6,
        secondary: [0.92, 0.88, 0.74],
    },
    Cat {
        name: "kite",
        plural: "kites",
        synonyms: &[],
        shape: Shape::Kite,
        colours: &[RED, BLUE, YELLOW, GREEN, PURPLE, ORANGE, PINK],
        groups: &["toys"],
        funcs: &["play", "fly"],
        lookalikes: &["hat", "star"],
        max_rot: 0.6,
        size: 1.1,
        wobble: 0.3,
        secondary: NONE,
    },
    Cat {
        name: "balloon",
        plural: "balloons",
        synonyms: &[],
        shape: Shape::Balloon,
        colours: &[RED, BLUE, YELLOW, GREEN, PURPLE, ORANGE, PINK],
        groups: &["toys"],
        funcs: &["play", "fly"],
        lookalikes: &["ball", "egg"],
        max_rot: 0.4,
        size: 1.0,
        wobble: 0.6,
        secondary: NONE,
    },
    Cat {
        name: "hammer",
        plural: "hammers",
        synonyms: &[("mallet", "mallets")],
        shape: Shape::Hammer,
        colours: &[RED, BLUE, YELLOW, GREEN, ORANGE],
        groups: &["tools"],
        funcs: &["repair"],
        lookalikes: &["screwdriver", "key"],
        max_rot: PI,
        size: 1.25,
        wobble: 0.25,
        secondary: METAL,
    },
    Cat {
        name: "screwdriver",
        plural: "screwdrivers",
        synonyms: &[],
        shape: Shape::Screwdriver,
        colours: &[RED, BLUE, YELLOW, GREEN, ORANGE],
        groups: &["tools"],
        funcs: &["repair"],
        lookalikes: &["hammer", "spoon"],
        max_rot: PI,
        size: 1.25,
        wobble: 0.25,
        secondary: METAL,
    },
    Cat {
        name: "spoon",
        plural: "spoons",
        synonyms: &[],
        shape: Shape::Spoon,
        colours: &[WHITE, RED, BLUE, GREEN, PINK],
        groups: &["kitchen"],
        funcs: &["stir"],
        lookalikes: &["screwdriver", "key"],
        max_rot: PI,
        size: 1.25,
        wobble: 0.3,
        secondary: NONE,
    },
];

/// The twelve instruction template kinds, in a fixed order.
pub const TEMPLATE_KINDS: &[&str] = &[
    "colour",
    "function",
    "group",
    "category",
    "colour_category",
    "spatial_relation",
    "spatial_extreme",
    "size",
    "exclusion",
    "occlusion",
    "same_colour",
    "count",
];

/// Share of category-colour combinations held out for the test split.
pub const HELDOUT_FRACTION: f64 = 0.15;

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string, then mixed: a stable hash (unlike std's `DefaultHasher`).
pub(crate) fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

pub(crate) fn mix(a: u64, b: u64) -> u64 {
    mix64(a ^ mix64(b))
}

/// `held[cat][colour]`: the combination appears only in the test split. Fixed (independent
/// of the seed): combinations are ordered by a stable hash of "category/colour" and taken
/// in that order while the category keeps at least two training colours, until
/// [`HELDOUT_FRACTION`] of all combinations are held out.
pub(crate) fn heldout_table() -> &'static Vec<[bool; 9]> {
    static T: std::sync::OnceLock<Vec<[bool; 9]>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut combos: Vec<(u64, usize, u8)> = Vec::new();
        for (ci, c) in CATS.iter().enumerate() {
            for &k in c.colours {
                combos.push((stable_hash(&format!("popen-synth-heldout/{}/{}", c.name, COLOURS[k as usize].0)), ci, k));
            }
        }
        let want = (combos.len() as f64 * HELDOUT_FRACTION).round() as usize;
        combos.sort();
        let mut held = vec![[false; 9]; CATS.len()];
        let mut left: Vec<usize> = CATS.iter().map(|c| c.colours.len()).collect();
        let mut n = 0;
        for (_, ci, k) in combos {
            if n == want {
                break;
            }
            if left[ci] > 2 {
                held[ci][k as usize] = true;
                left[ci] -= 1;
                n += 1;
            }
        }
        held
    })
}

pub(crate) fn is_heldout(cat: usize, colour: u8) -> bool {
    heldout_table()[cat][colour as usize]
}

pub(crate) fn cat_index(name: &str) -> Option<usize> {
    CATS.iter().position(|c| c.name == name)
}

pub(crate) fn func(id: &str) -> &'static Func {
    FUNCS.iter().find(|f| f.id == id).expect("function id in table")
}

pub(crate) fn group(id: &str) -> &'static Group {
    GROUPS.iter().find(|g| g.id == id).expect("group id in table")
}

// ---------------------------------------------------------------- exported lexicon

/// The vocabulary of the benchmark, written to `lexicon.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Lexicon {
    pub version: u32,
    /// Every object category, in a fixed order.
    pub categories: Vec<CategoryEntry>,
    pub colours: Vec<ColourEntry>,
    pub groups: Vec<GroupEntry>,
    pub functions: Vec<FunctionEntry>,
    /// Category-colour combinations that appear only in the test split.
    pub heldout_combos: Vec<Combo>,
    pub heldout_fraction: f64,
    /// Every surface form (lowercase; singular and plural of canonical names and synonyms,
    /// multi-word forms included) by which the generator names an object, mapped to its
    /// canonical category. CHAIR: lowercase the text, match forms on word boundaries,
    /// longest form first; each match is one object mention.
    pub mention_forms: BTreeMap<String, String>,
    /// Words the generator uses for "some object" that are not object mentions.
    pub generic_nouns: Vec<String>,
    pub template_kinds: Vec<String>,
    /// How answers name targets, for parsers.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CategoryEntry {
    pub name: String,
    pub plural: String,
    /// Synonyms (singular) and their plurals, same order.
    pub synonyms: Vec<String>,
    pub synonym_plurals: Vec<String>,
    pub groups: Vec<String>,
    pub functions: Vec<String>,
    /// Body colours this category is drawn in.
    pub colours: Vec<String>,
    pub lookalikes: Vec<String>,
    pub shape: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ColourEntry {
    pub name: String,
    /// Base colour before per-object jitter, shading and texture.
    pub rgb: [u8; 3],
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroupEntry {
    pub id: String,
    /// Words used in instructions: plural ("toys"), singular ("toy"), counted ("toys").
    pub plural: String,
    pub singular: String,
    pub counted: String,
    pub members: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FunctionEntry {
    pub id: String,
    pub members: Vec<String>,
    pub questions: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Combo {
    pub category: String,
    pub colour: String,
}

impl Lexicon {
    /// Canonical category of a mention form (lowercase), if it is one.
    pub fn canonical(&self, form: &str) -> Option<&str> {
        self.mention_forms.get(&form.to_lowercase()).map(|s| s.as_str())
    }

    /// Object mentions in a text, CHAIR style: lowercase, split into words, match the
    /// longest mention form at each position. Returns (canonical category, matched form).
    pub fn find_mentions(&self, text: &str) -> Vec<(String, String)> {
        let lower = text.to_lowercase();
        let words: Vec<&str> =
            lower.split(|c: char| !(c.is_alphanumeric() || c == '\'')).filter(|w| !w.is_empty()).collect();
        let max_words = self.mention_forms.keys().map(|k| k.split(' ').count()).max().unwrap_or(1);
        let mut out = Vec::new();
        let mut i = 0;
        while i < words.len() {
            let mut hit = None;
            for n in (1..=max_words.min(words.len() - i)).rev() {
                let form = words[i..i + n].join(" ");
                if let Some(c) = self.mention_forms.get(&form) {
                    hit = Some((n, c.clone(), form));
                    break;
                }
            }
            match hit {
                Some((n, c, form)) => {
                    out.push((c, form));
                    i += n;
                }
                None => i += 1,
            }
        }
        out
    }
}

/// The benchmark's lexicon (fixed; independent of the seed and the config).
pub fn lexicon() -> Lexicon {
    let held = heldout_table();
    let mut mention_forms = BTreeMap::new();
    let categories = CATS
        .iter()
        .map(|c| {
            mention_forms.insert(c.name.to_string(), c.name.to_string());
            mention_forms.insert(c.plural.to_string(), c.name.to_string());
            for (s, p) in c.synonyms {
                mention_forms.insert(s.to_string(), c.name.to_string());
                mention_forms.insert(p.to_string(), c.name.to_string());
            }
            CategoryEntry {
                name: c.name.into(),
                plural: c.plural.into(),
                synonyms: c.synonyms.iter().map(|s| s.0.to_string()).collect(),
                synonym_plurals: c.synonyms.iter().map(|s| s.1.to_string()).collect(),
                groups: c.groups.iter().map(|s| s.to_string()).collect(),
                functions: c.funcs.iter().map(|s| s.to_string()).collect(),
                colours: c.colours.iter().map(|&k| COLOURS[k as usize].0.to_string()).collect(),
                lookalikes: c.lookalikes.iter().map(|s| s.to_string()).collect(),
                shape: c.shape.name().into(),
            }
        })
        .collect();
    let members = |f: &dyn Fn(&Cat) -> bool| CATS.iter().filter(|c| f(c)).map(|c| c.name.to_string()).collect();
    let mut heldout_combos = Vec::new();
    for (ci, c) in CATS.iter().enumerate() {
        for &k in c.colours {
            if held[ci][k as usize] {
                heldout_combos.push(Combo { category: c.name.into(), colour: COLOURS[k as usize].0.into() });
            }
        }
    }
    Lexicon {
        version: 1,
        categories,
        colours: COLOURS
            .iter()
            .map(|(n, c)| ColourEntry {
                name: n.to_string(),
                rgb: [(c[0] * 255.0).round() as u8, (c[1] * 255.0).round() as u8, (c[2] * 255.0).round() as u8],
            })
            .collect(),
        groups: GROUPS
            .iter()
            .map(|g| GroupEntry {
                id: g.id.into(),
                plural: g.plural.into(),
                singular: g.singular.into(),
                counted: g.counted.into(),
                members: members(&|c: &Cat| c.groups.contains(&g.id)),
            })
            .collect(),
        functions: FUNCS
            .iter()
            .map(|f| FunctionEntry {
                id: f.id.into(),
                members: members(&|c: &Cat| c.funcs.contains(&f.id)),
                questions: f.questions.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        heldout_combos,
        heldout_fraction: HELDOUT_FRACTION,
        mention_forms,
        generic_nouns: ["object", "objects", "thing", "things", "item", "items", "one", "ones"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        template_kinds: TEMPLATE_KINDS.iter().map(|s| s.to_string()).collect(),
        notes: vec![
            "Answers name every target as 'the <colour> <noun> <seg>' (the colour is sometimes left out when the \
             category occurs once); <noun> is a mention form of the target's category."
                .into(),
            "Answers may also mention non-target objects of the image without <seg> (references of spatial, \
             occlusion, exclusion and same-colour questions); they are present in the image, never hallucinated."
                .into(),
            "No colour name is also a mention form.".into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_consistent() {
        for c in CATS {
            for g in c.groups {
                assert!(GROUPS.iter().any(|x| x.id == *g), "{}: group {g}", c.name);
            }
            for f in c.funcs {
                assert!(FUNCS.iter().any(|x| x.id == *f), "{}: function {f}", c.name);
            }
            for l in c.lookalikes {
                assert!(cat_index(l).is_some(), "{}: lookalike {l}", c.name);
            }
            assert!(!c.colours.is_empty());
        }
        let lex = lexicon();
        for (name, _) in COLOURS {
            assert!(lex.canonical(name).is_none(), "colour {name} is also an object name");
        }
        for f in FUNCS {
            assert!(CATS.iter().any(|c| c.funcs.contains(&f.id)), "function {} has no members", f.id);
        }
        // Every category keeps at least two training colours (or all when it has two).
        for (ci, c) in CATS.iter().enumerate() {
            let train = c.colours.iter().filter(|&&k| !is_heldout(ci, k)).count();
            assert!(train >= 2.min(c.colours.len()), "{}", c.name);
        }
        assert!(!lex.heldout_combos.is_empty());
        assert_eq!(
            lex.find_mentions("The red toy ball <seg> is left of the crescent moon and two leaves."),
            vec![
                ("ball".to_string(), "toy ball".to_string()),
                ("moon".to_string(), "crescent moon".to_string()),
                ("leaf".to_string(), "leaves".to_string())
            ]
        );
    }
}
